//! Elastic launches (`--nnodes MIN:MAX --rdzv-backend c10d`) with real `ferrun` processes:
//! several agents on one host over loopback, and hosts in network namespaces on a bridge.

mod support;

use std::process::{Command, Stdio};

use ferrun_tests::netns::Hosts;
use support::elastic::{agent, lose_the_third, succeeded, Agent, LIMIT};
use support::{ferrun, free_port, run_child, text, worker};

#[test]
fn a_failed_worker_restarts_every_node_into_a_new_round_counted_once() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let mut agents: Vec<Agent> = (0..2)
        .map(|_| {
            Agent::start(agent(
                "2:2",
                &endpoint,
                &["--max-restarts", "1"],
                &["--fail-rank", "1"],
            ))
        })
        .collect();
    // (Node 0 may never start round 0's workers: node 1's can fail before node 0 hears that
    // every node is ready. Each node runs round 1, with the restart counted once.)
    for a in &mut agents {
        let line = a.wait_line("restart 1");
        assert!(line.contains("world 2"), "{line}");
    }
    for a in agents {
        succeeded(a, "the restarted job");
    }
}

#[test]
fn a_job_whose_nodes_never_all_arrive_fails_naming_who_joined() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let mut cmd = agent("2:2", &endpoint, &["--rdzv-conf", "join_timeout=1.5"], &[]);
    let out = run_child(cmd.spawn().expect("spawn"), LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("1 of at least 2 nodes joined within the join timeout"),
        "{stderr}"
    );
}

#[test]
fn a_node_with_a_wrong_token_is_refused_and_the_others_run_on() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let with = |token: &str, args: &[&str]| {
        let mut cmd = agent("1:2", &endpoint, &[], args);
        cmd.env("FERRUN_RDZV_TOKEN", token);
        cmd
    };
    let mut host = Agent::start(with("the-job-token-0123456789", &["--exit-world", "2"]));
    host.wait_line("world 1");
    let out = run_child(
        with("a-stranger-token-0123456789", &[])
            .spawn()
            .expect("spawn"),
        LIMIT,
    );
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("needs the job's token"), "{stderr}");
    // The job's own second node joins: a scale-up to two nodes, after which both finish.
    let mut second = Agent::start(with("the-job-token-0123456789", &["--exit-world", "2"]));
    second.wait_line("world 2");
    host.wait_line("world 2");
    succeeded(second, "the second node");
    succeeded(host, "the host");
}

/// Three namespaced hosts, `--nnodes 2:3`: all three run; host 2 is lost (`kill` SIGKILLs its
/// agent, or `cut` takes its link down); hosts 0 and 1 go on in a new round of two. Returns
/// the lost host's agent.
fn three_hosts_lose_one(lose: impl FnOnce(&Hosts, &Agent)) -> Agent {
    let hosts = Hosts::bridged(3).expect("three namespaced hosts");
    let endpoint = format!("{}:29400", hosts.addrs[0]);
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let cmd = agent("2:3", &endpoint, &[], &["--exit-world", "2"]);
            Agent::start_on(&hosts, i, &cmd)
        })
        .collect();
    let master = format!("master {}:", hosts.addrs[0]);
    lose_the_third(
        &hosts,
        agents,
        |line| assert!(line.contains(&master), "{line}"),
        lose,
    )
}

#[test]
fn three_hosts_go_on_without_one_whose_agent_was_killed() {
    let _killed = three_hosts_lose_one(|_, victim| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill");
    });
}

#[test]
fn three_hosts_go_on_without_one_whose_link_was_cut() {
    let cut = three_hosts_lose_one(|hosts, _| hosts.cut(2).expect("link down"));
    // The cut-off agent does not hang: it sees its heartbeats go unanswered, stops its
    // workers and says why.
    let out = cut.finish();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("cut off from it"), "{stderr}");
}

/// `ferrun` on host `i` of `hosts` running the Gloo trainer, endpoint on host 0.
fn gloo_agent(hosts: &Hosts, i: usize, worlds: &str, state: &std::path::Path) -> Agent {
    let endpoint = format!("{}:29400", hosts.addrs[0]);
    let mut cmd = ferrun();
    cmd.env_remove("GLOO_SOCKET_IFNAME")
        .args([
            "--nnodes",
            "2:3",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
        ])
        .args(["--rdzv-endpoint", &endpoint, "--rdzv-id", "gloo-el"])
        .args([
            "--rdzv-conf",
            "last_call_timeout=2,keep_alive_interval=0.5,keep_alive_max_attempt=2,join_timeout=60",
        ])
        .arg(worker("gloo_elastic.py"))
        .args(["--worlds", worlds, "--state", &state.display().to_string()]);
    Agent::start_on(hosts, i, &cmd)
}

#[test]
fn gloo_training_on_three_hosts_goes_on_without_a_killed_one_and_takes_in_a_fourth() {
    let hosts = Hosts::bridged(4).expect("four namespaced hosts");
    let state = tempfile::tempdir().expect("a state dir");
    let worlds = "3,2,3";
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| gloo_agent(&hosts, i, worlds, state.path()))
        .collect();
    for a in &mut agents {
        a.wait_line("world 3 rank");
    }
    // Host 2's agent and workers are killed: hosts 0 and 1 train on as a world of two.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agents[2].pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let _killed = agents.pop();
    for a in &mut agents {
        let line = a.wait_line("world 2 rank");
        assert!(line.contains("sum 3 restart 0"), "{line}");
    }
    // A fourth host joins: a scale-up back to three, which trains to the end.
    agents.push(gloo_agent(&hosts, 3, worlds, state.path()));
    for a in &mut agents {
        let line = a.wait_line("world 3 rank");
        assert!(line.contains("sum 6 restart 0"), "{line}");
    }
    for a in agents {
        succeeded(a, "a node of the final round");
    }
    let seen = std::fs::read_to_string(state.path().join("worlds")).expect("worlds");
    assert!(seen.ends_with("3 2 3"), "{seen}");
}

#[test]
fn gloo_training_on_three_hosts_goes_on_without_one_whose_link_was_cut() {
    let hosts = Hosts::bridged(3).expect("three namespaced hosts");
    let state = tempfile::tempdir().expect("a state dir");
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| gloo_agent(&hosts, i, "3,2", state.path()))
        .collect();
    for a in &mut agents {
        a.wait_line("world 3 rank");
    }
    // No reset reaches anyone: the survivors' Gloo calls would wait on host 2 for good.
    hosts.cut(2).expect("link down");
    let cut = agents.pop().expect("three");
    for a in &mut agents {
        let line = a.wait_line("world 2 rank");
        assert!(line.contains("sum 3 restart 0"), "{line}");
    }
    for a in agents {
        succeeded(a, "a survivor");
    }
    let out = cut.finish();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("cut off from it"), "{stderr}");
}

#[test]
fn a_standalone_rendezvous_serves_agents_that_do_not_host_it() {
    let port = free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_ferrun"));
    server
        .args([
            "rendezvous",
            "serve",
            "--nnodes",
            "2:2",
            "--host",
            "127.0.0.1",
        ])
        .args([
            "--port",
            &port.to_string(),
            "--rdzv-conf",
            "last_call_timeout=1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut server = server.spawn().expect("spawn the server");
    let banner = std::io::BufRead::lines(std::io::BufReader::new(
        server.stderr.take().expect("stderr"),
    ))
    .map_while(Result::ok)
    .find(|l| l.contains("serving the rendezvous"))
    .expect("a banner");
    assert!(banner.contains(&format!("127.0.0.1:{port}")), "{banner}");
    let endpoint = format!("127.0.0.1:{port}");
    let agents: Vec<Agent> = (0..2)
        .map(|_| {
            Agent::start(agent(
                "2:2",
                &endpoint,
                &["--rdzv-conf", "is_host=false,last_call_timeout=1"],
                &[],
            ))
        })
        .collect();
    for a in agents {
        let stderr = succeeded(a, "an agent");
        assert!(!stderr.contains("hosting the rendezvous"), "{stderr}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(server.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let out = run_child(server, LIMIT);
    assert!(
        out.status.success(),
        "the server ends cleanly on SIGTERM: {out:?}"
    );
}

#[test]
fn a_bad_serve_command_line_names_the_fix() {
    let out = run_child(
        Command::new(env!("CARGO_BIN_EXE_ferrun"))
            .args(["rendezvous", "serve", "--nnodes", "4:2"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("--nnodes \"4:2\" is not valid"),
        "{out:?}"
    );
}

#[test]
fn agents_with_the_jobs_certificates_and_token_run_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = support::pki::Pki::new(dir.path(), "job");
    let (cert, key) = pki.issue("127.0.0.1");
    let conf = format!(
        "last_call_timeout=1,tls_ca={},tls_cert={},tls_key={}",
        pki.ca.display(),
        cert.display(),
        key.display()
    );
    let endpoint = format!("127.0.0.1:{}", free_port());
    let agents: Vec<Agent> = (0..2)
        .map(|_| {
            let mut cmd = agent("2:2", &endpoint, &["--rdzv-conf", &conf], &[]);
            cmd.env("FERRUN_RDZV_TOKEN", "tls-job-token-0123456789");
            Agent::start(cmd)
        })
        .collect();
    for a in agents {
        succeeded(a, "a node over TLS");
    }
}

/// A torch `TCPStore` client on `hosts[i]` connecting to `master` (`addr:port`): whether it
/// got through the handshake.
fn torch_store_reaches(hosts: &Hosts, i: usize, master: &str) -> bool {
    let (addr, port) = master.rsplit_once(':').expect("addr:port");
    let mut cmd = Command::new(support::venv().join("bin/python"));
    cmd.args([
        "-c",
        "import datetime, sys, torch.distributed as d\n\
         d.TCPStore(sys.argv[1], int(sys.argv[2]), is_master=False, \
         timeout=datetime.timedelta(seconds=5), use_libuv=False)",
        addr,
        port,
    ]);
    let out = support::run(hosts.on(i, &cmd), LIMIT);
    out.status.success()
}

#[test]
fn with_a_token_the_rounds_store_serves_its_hosts_and_refuses_others() {
    let hosts = Hosts::bridged(3).expect("three namespaced hosts");
    let endpoint = format!("{}:29400", hosts.addrs[0]);
    let release = tempfile::tempdir().expect("tempdir");
    let done = release.path().join("done").display().to_string();
    let mut agents: Vec<Agent> = (0..2)
        .map(|i| {
            let mut cmd = agent("2:2", &endpoint, &[], &["--exit-when", &done]);
            cmd.env("FERRUN_RDZV_TOKEN", "store-job-token-0123456789");
            Agent::start_on(&hosts, i, &cmd)
        })
        .collect();
    let line = agents[1].wait_line("placed");
    let master = line
        .rsplit(' ')
        .next()
        .expect("master addr:port")
        .to_owned();
    assert!(master.starts_with(&hosts.addrs[0]), "{line}");
    assert!(
        torch_store_reaches(&hosts, 1, &master),
        "a host of the round reaches its store with torch's client"
    );
    assert!(
        !torch_store_reaches(&hosts, 2, &master),
        "a host outside the round is refused"
    );
    std::fs::write(&done, "").expect("release the workers");
    let mut stderrs = agents.drain(..).map(|a| succeeded(a, "a node"));
    let host = stderrs.next().expect("node 0");
    assert!(
        host.contains(&format!("refused a connection from {}", hosts.addrs[2])),
        "{host}"
    );
}

#[test]
fn standalone_runs_on_a_local_rendezvous_service_and_restarts_through_it() {
    let mut cmd = ferrun();
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
    ])
    .arg(worker("elastic.py"))
    .args(["--fail-rank", "1"]);
    let out = support::run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("hosting the rendezvous on 127.0.0.1:"),
        "{stderr}"
    );
    for rank in [0, 1] {
        assert!(
            stdout.contains(&format!(
                "placed rank {rank} world 2 group 0 restart 1 master localhost:"
            )),
            "{stdout}"
        );
    }
}

//! Elastic launches on the etcd backend (`--rdzv-backend etcd`) with a real etcd (Debian's
//! `etcd-server`) and real `ferrun` processes: on loopback, and on hosts in network
//! namespaces with etcd on a host of its own.

mod support;

use ferrun_tests::etcd::Etcd;
use ferrun_tests::netns::Hosts;
use support::elastic::{agent_of, lose_the_third, succeeded, Agent, LIMIT};
use support::{free_port, run_child, text};

/// Fast leases (1 s × 2, which etcd raises to its 2 s minimum) and a 15 s join timeout,
/// which also bounds how long a node waits for an unreachable etcd.
const CONF: &str =
    "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2,join_timeout=15";

fn etcd_agent(nnodes: &str, endpoint: &str, script_args: &[&str]) -> std::process::Command {
    agent_of(
        "etcd",
        nnodes,
        endpoint,
        &["--rdzv-conf", CONF],
        script_args,
    )
}

fn kill(agent: &Agent) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
}

#[test]
fn a_job_whose_nodes_never_all_arrive_fails_naming_who_joined() {
    let etcd = Etcd::start().expect("etcd");
    let mut cmd = agent_of(
        "etcd",
        "2:2",
        &etcd.endpoint(),
        &["--rdzv-conf", "join_timeout=1.5"],
        &[],
    );
    let out = run_child(cmd.spawn().expect("spawn"), LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("1 of at least 2 nodes joined within the join timeout"),
        "{stderr}"
    );
}

#[test]
fn an_etcd_that_is_not_there_is_named_with_the_fix() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let mut cmd = agent_of(
        "etcd",
        "1:2",
        &endpoint,
        &["--rdzv-conf", "join_timeout=2"],
        &[],
    );
    let out = run_child(cmd.spawn().expect("spawn"), LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("etcd at http://{endpoint} did not answer")),
        "{stderr}"
    );
    assert!(stderr.contains("check that etcd runs there"), "{stderr}");
}

#[test]
fn a_failed_worker_restarts_every_node_counted_once() {
    let etcd = Etcd::start().expect("etcd");
    let mut agents: Vec<Agent> = (0..2)
        .map(|_| {
            Agent::start(agent_of(
                "etcd",
                "2:2",
                &etcd.endpoint(),
                &["--rdzv-conf", CONF, "--max-restarts", "1"],
                &["--fail-rank", "1"],
            ))
        })
        .collect();
    for a in &mut agents {
        let line = a.wait_line("restart 1");
        assert!(line.contains("world 2"), "{line}");
    }
    for a in agents {
        succeeded(a, "the restarted job");
    }
}

#[test]
fn the_job_rides_out_an_etcd_restart_and_scales_up_after_it() {
    let mut etcd = Etcd::start().expect("etcd");
    let dir = tempfile::tempdir().expect("tempdir");
    let done = dir.path().join("done");
    let done = done.display().to_string();
    let args = ["--exit-when", done.as_str()];
    let mut agents: Vec<Agent> = (0..2)
        .map(|_| Agent::start(etcd_agent("2:3", &etcd.endpoint(), &args)))
        .collect();
    for a in &mut agents {
        a.wait_line("world 2");
    }
    etcd.restart().expect("etcd comes back");
    // The rendezvous works after the restart: a third node joins, a scale-up to three.
    agents.push(Agent::start(etcd_agent("2:3", &etcd.endpoint(), &args)));
    for a in &mut agents {
        let line = a.wait_line("world 3");
        assert!(
            line.contains("restart 0"),
            "a scale-up is not counted: {line}"
        );
    }
    std::fs::write(&done, "").expect("say done");
    for a in agents {
        succeeded(a, "a node after etcd's restart");
    }
}

/// Three namespaced training hosts and etcd on a fourth, `--nnodes 2:3`: all three run; host
/// 2 is lost (`lose`); hosts 0 and 1 go on in a new round of two. Returns the lost agent.
fn three_hosts_lose_one(lose: impl FnOnce(&Hosts, &Agent)) -> Agent {
    let hosts = Hosts::bridged(4).expect("four namespaced hosts");
    // A namespace of its own: etcd's usual ports are free there.
    let etcd = Etcd::start_with(&hosts.addrs[3], 2379, 2380, Some(&hosts.names[3])).expect("etcd");
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let cmd = etcd_agent("2:3", &etcd.endpoint(), &["--exit-world", "2"]);
            Agent::start_on(&hosts, i, &cmd)
        })
        .collect();
    lose_the_third(&hosts, agents, |_| {}, lose)
}

#[test]
fn three_hosts_on_etcd_go_on_without_one_whose_agent_was_killed() {
    let _killed = three_hosts_lose_one(|_, victim| kill(victim));
}

#[test]
fn three_hosts_on_etcd_go_on_without_one_whose_link_was_cut() {
    let cut = three_hosts_lose_one(|hosts, _| hosts.cut(2).expect("link down"));
    // The cut-off agent does not hang: once etcd has been out of its reach for the join
    // timeout, it stops its workers and says why.
    let out = cut.finish();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("lost the etcd rendezvous"), "{stderr}");
}

#[test]
fn over_tls_nodes_with_the_jobs_certificates_run_and_others_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = support::pki::Pki::new(dir.path(), "etcd");
    let (cert, key) = pki.issue("127.0.0.1");
    let (client_cert, client_key) = pki.issue("localhost");
    let etcd = Etcd::start_tls(ferrun_tests::etcd::EtcdTls {
        cert,
        key,
        client_ca: pki.ca.clone(),
    })
    .expect("etcd over TLS");
    let endpoint = format!("https://{}", etcd.endpoint());
    // torchrun's names for the files: cacert, cert, key.
    let with = |conf: String| {
        agent_of(
            "etcd",
            "2:2",
            &endpoint,
            &["--rdzv-conf", &format!("last_call_timeout=1,{conf}")],
            &[],
        )
    };
    let files = format!(
        "join_timeout=30,cacert={},cert={},key={}",
        pki.ca.display(),
        client_cert.display(),
        client_key.display()
    );
    let agents: Vec<Agent> = (0..2).map(|_| Agent::start(with(files.clone()))).collect();
    for a in agents {
        succeeded(a, "a node over TLS");
    }
    let stranger = support::pki::Pki::new(dir.path(), "stranger");
    for (conf, who) in [
        (
            format!("join_timeout=2,cacert={}", pki.ca.display()),
            "a node without a client certificate",
        ),
        (
            format!("join_timeout=2,cacert={}", stranger.ca.display()),
            "a node that does not trust etcd's CA",
        ),
    ] {
        let out = run_child(with(conf).spawn().expect("spawn"), LIMIT);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{who}: {stdout}\n{stderr}");
        assert!(stderr.contains(&etcd.endpoint()), "{who}: {stderr}");
        assert!(
            stderr.contains("the TLS handshake failed"),
            "{who}: {stderr}"
        );
    }
}

//! The rendezvous' messages on the wire: checked on the way in, converted on the way out.
//!
//! # Trust
//! Everything a client sends is checked here before the state machine sees it: run ids and
//! node ids are short and of a plain alphabet (they name keys and log lines), addresses and
//! causes are bounded, ports are ports. A bad field is `invalid_argument` naming the field.

use tonic::Status;

use super::proto;
use crate::rendezvous::round::{NodeDesc, NodeId, Placement, RoundEnd, RoundError, Standing, View};

/// Longest run id (`--rdzv-id`).
pub const MAX_RUN_ID: usize = 128;
/// Longest node id.
pub const MAX_NODE_ID: usize = 256;
/// Longest node address.
pub const MAX_ADDR: usize = 255;
/// Longest failure cause or close reason.
pub const MAX_CAUSE: usize = 4096;

/// A run id or node id: 1..=`max` bytes of letters, digits, `.`, `_`, `-`, `:`, `@`.
pub fn name(field: &str, value: &str, max: usize) -> Result<(), Status> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "._-:@".contains(c);
    if value.is_empty() || value.len() > max || !value.chars().all(plain) {
        return Err(Status::invalid_argument(format!(
            "{field} must be 1 to {max} letters, digits or . _ - : @ (got {} bytes)",
            value.len()
        )));
    }
    Ok(())
}

/// A free-text field (a cause, a reason): at most [`MAX_CAUSE`] bytes.
pub fn text<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.len() > MAX_CAUSE {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; at most {MAX_CAUSE}",
            value.len()
        )));
    }
    Ok(value)
}

/// The node a Join describes.
pub fn node(node: Option<proto::Node>) -> Result<NodeDesc, Status> {
    let node = node.ok_or_else(|| Status::invalid_argument("join without a node"))?;
    name("node id", &node.id, MAX_NODE_ID)?;
    if node.addr.is_empty()
        || node.addr.len() > MAX_ADDR
        || node.addr.chars().any(char::is_whitespace)
    {
        return Err(Status::invalid_argument(format!(
            "node {}: address must be 1 to {MAX_ADDR} bytes without spaces",
            node.id
        )));
    }
    let store_port = u16::try_from(node.store_port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "node {}: store port {} is not a port",
                node.id, node.store_port
            ))
        })?;
    Ok(NodeDesc {
        id: NodeId(node.id),
        addr: node.addr,
        store_port,
        nproc: node.nproc,
    })
}

/// The state machine's refusal as a gRPC status.
pub fn status(error: &RoundError) -> Status {
    let message = error.to_string();
    match error {
        RoundError::UnknownNode(_) => Status::not_found(message),
        RoundError::InvalidNode { .. } => Status::invalid_argument(message),
        RoundError::Full(_) => Status::resource_exhausted(message),
        RoundError::Closed(_)
        | RoundError::Finished
        | RoundError::TimedOut { .. }
        | RoundError::NotParticipant(_) => Status::failed_precondition(message),
    }
}

fn names(ids: &[NodeId]) -> proto::NodeList {
    proto::NodeList {
        nodes: ids.iter().map(|i| i.0.clone()).collect(),
    }
}

/// A view for the wire.
pub fn view_out(view: &View) -> proto::View {
    use proto::view::Standing as S;
    let standing = match &view.standing {
        Standing::Gathering { joined } => S::Gathering(*joined),
        Standing::Assigned(p) => S::Assigned(proto::Placement {
            node_rank: p.node_rank,
            nnodes: p.nnodes,
            base_rank: p.base_rank,
            world_size: p.world_size,
            master_addr: p.master_addr.clone(),
            master_port: u32::from(p.master_port),
            all_ready: p.all_ready,
            hosts: p.hosts.to_vec(),
        }),
        Standing::Waiting => S::Waiting(proto::Empty {}),
        Standing::Unknown => S::Unknown(proto::Empty {}),
        Standing::Finished => S::Closed(String::new()),
        Standing::Closed { reason } => S::Closed(reason.clone()),
        Standing::TimedOut { joined } => S::TimedOut(names(joined)),
    };
    let finished = matches!(view.standing, Standing::Finished);
    proto::View {
        round: view.round,
        restart_count: view.restart_count,
        standing: Some(standing),
        last_end: view.last_end.as_ref().map(end_out),
        waiting_nodes: view.waiting,
        finished,
    }
}

fn end_out(end: &RoundEnd) -> proto::RoundEnd {
    use proto::round_end::Why;
    let (why, cause) = match end {
        RoundEnd::Failed { node, cause } => (Why::FailedNode(node.0.clone()), cause.clone()),
        RoundEnd::Lost(ids) => (Why::Lost(names(ids)), String::new()),
        RoundEnd::Left(id) => (Why::Left(id.0.clone()), String::new()),
        RoundEnd::ScaleUp(id) => (Why::ScaleUp(id.0.clone()), String::new()),
    };
    proto::RoundEnd {
        why: Some(why),
        cause,
    }
}

/// A view from the wire (the agent's side). The service is trusted as far as the job's token
/// is, but its numbers are still checked: a port that is not one is an error.
pub fn view_in(view: proto::View) -> Result<View, String> {
    use proto::view::Standing as S;
    let ids = |l: proto::NodeList| l.nodes.into_iter().map(NodeId).collect::<Vec<_>>();
    let standing = match view.standing {
        Some(S::Gathering(joined)) => Standing::Gathering { joined },
        Some(S::Assigned(p)) => {
            let master_port = u16::try_from(p.master_port)
                .map_err(|_| format!("master port {} is not a port", p.master_port))?;
            if p.node_rank >= p.nnodes || p.base_rank >= p.world_size {
                return Err(format!(
                    "placement out of range: node rank {} of {}, base rank {} of {}",
                    p.node_rank, p.nnodes, p.base_rank, p.world_size
                ));
            }
            let hosts_expected = if p.node_rank == 0 {
                p.nnodes as usize
            } else {
                0
            };
            if p.hosts.len() != hosts_expected || p.hosts.iter().any(|h| h.len() > MAX_ADDR) {
                return Err(format!(
                    "placement of node {} of {} names {} hosts (expected {hosts_expected}, each at most {MAX_ADDR} bytes)",
                    p.node_rank, p.nnodes, p.hosts.len()
                ));
            }
            Standing::Assigned(Placement {
                node_rank: p.node_rank,
                nnodes: p.nnodes,
                base_rank: p.base_rank,
                world_size: p.world_size,
                master_addr: p.master_addr,
                master_port,
                all_ready: p.all_ready,
                hosts: p.hosts.into(),
            })
        }
        Some(S::Waiting(_)) => Standing::Waiting,
        Some(S::Unknown(_)) | None => Standing::Unknown,
        Some(S::Closed(_)) if view.finished => Standing::Finished,
        Some(S::Closed(reason)) => Standing::Closed { reason },
        Some(S::TimedOut(l)) => Standing::TimedOut { joined: ids(l) },
    };
    let last_end = view.last_end.and_then(|e| {
        use proto::round_end::Why;
        Some(match e.why? {
            Why::FailedNode(node) => RoundEnd::Failed {
                node: NodeId(node),
                cause: e.cause,
            },
            Why::Lost(l) => RoundEnd::Lost(ids(l)),
            Why::Left(id) => RoundEnd::Left(NodeId(id)),
            Why::ScaleUp(id) => RoundEnd::ScaleUp(NodeId(id)),
        })
    });
    Ok(View {
        round: view.round,
        restart_count: view.restart_count,
        standing,
        last_end,
        waiting: view.waiting_nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(node_rank: u32, hosts: &[&str]) -> proto::View {
        proto::View {
            round: 1,
            standing: Some(proto::view::Standing::Assigned(proto::Placement {
                node_rank,
                nnodes: 2,
                base_rank: node_rank,
                world_size: 2,
                master_addr: "10.0.0.1".into(),
                master_port: 29500,
                all_ready: true,
                hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn node_0_is_told_every_hosts_address_and_the_others_none() {
        let view = view_in(assigned(0, &["10.0.0.1", "10.0.0.2"])).expect("node 0's view");
        let Standing::Assigned(p) = &view.standing else {
            panic!("{view:?}")
        };
        assert_eq!(&*p.hosts, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(view_in(view_out(&view)).expect("round trip"), view);
        assert!(view_in(assigned(1, &[])).is_ok());
        let long = "h".repeat(MAX_ADDR + 1);
        for bad in [
            assigned(0, &["10.0.0.1"]),
            assigned(1, &["10.0.0.1", "10.0.0.2"]),
            assigned(0, &["10.0.0.1", &long]),
        ] {
            let why = view_in(bad).expect_err("refused");
            assert!(why.contains("hosts"), "{why}");
        }
    }
}

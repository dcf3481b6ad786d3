//! The worker environment contract.
//!
//! `torchrun` hands each worker a fixed set of environment variables
//! (`torch/distributed/elastic/agent/server/local_elastic_agent.py::_start_workers`). ferrun's
//! launcher writes exactly that set with [`WorkerEnv::to_env`], and Rust workers read it back
//! with [`WorkerEnv::from_env`]; Python workers read it through `torch.distributed` as usual.
//!
//! # Guarantees
//! - `to_env` and `from_env` round-trip: `WorkerEnv::from_lookup(lookup_of(w.to_env())) == w`.
//! - Values are written in torchrun's spelling (`"True"`/`"False"` for booleans, decimal ints).
//!
//! # Errors
//! [`EnvError::Missing`] names a variable that is absent; [`EnvError::Malformed`] names one whose
//! value does not parse, with the value and what was expected; [`EnvError::Inconsistent`] says
//! which two variables disagree (a rank not below its world size).

use std::path::PathBuf;

/// Names of the contract's variables, exactly as torchrun spells them.
pub mod vars {
    /// Global rank of the worker.
    pub const RANK: &str = "RANK";
    /// Rank of the worker within its node.
    pub const LOCAL_RANK: &str = "LOCAL_RANK";
    /// Number of workers in the job.
    pub const WORLD_SIZE: &str = "WORLD_SIZE";
    /// Number of workers on this node.
    pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
    /// Rank of this node (agent) in the rendezvous.
    pub const GROUP_RANK: &str = "GROUP_RANK";
    /// Number of nodes (agents) in the rendezvous.
    pub const GROUP_WORLD_SIZE: &str = "GROUP_WORLD_SIZE";
    /// The worker's role (`--role`).
    pub const ROLE_NAME: &str = "ROLE_NAME";
    /// Rank among the workers of the same role.
    pub const ROLE_RANK: &str = "ROLE_RANK";
    /// Number of workers of the same role.
    pub const ROLE_WORLD_SIZE: &str = "ROLE_WORLD_SIZE";
    /// Host of the store the workers bootstrap through.
    pub const MASTER_ADDR: &str = "MASTER_ADDR";
    /// Port of the store the workers bootstrap through.
    pub const MASTER_PORT: &str = "MASTER_PORT";
    /// How many times the worker group has been restarted (0 on the first attempt).
    pub const RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
    /// `--max-restarts`.
    pub const MAX_RESTARTS: &str = "TORCHELASTIC_MAX_RESTARTS";
    /// The run id (`--rdzv-id`, or a fresh uuid with `--standalone`).
    pub const RUN_ID: &str = "TORCHELASTIC_RUN_ID";
    /// `"True"` when the workers must connect to the agent's store instead of hosting one.
    pub const USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";
    /// Where the worker writes its error report (torchrun's JSON format).
    pub const ERROR_FILE: &str = "TORCHELASTIC_ERROR_FILE";
    /// NCCL's asynchronous error handling; inherited, or `"1"`.
    pub const NCCL_ASYNC_ERROR_HANDLING: &str = "TORCH_NCCL_ASYNC_ERROR_HANDLING";
    /// Threads per worker for OpenMP; the launcher sets `1` when unset and nproc > 1.
    pub const OMP_NUM_THREADS: &str = "OMP_NUM_THREADS";

    /// Every variable of the contract, in the order [`super::WorkerEnv::to_env`] writes them.
    pub const ALL: [&str; 18] = [
        RANK,
        LOCAL_RANK,
        WORLD_SIZE,
        LOCAL_WORLD_SIZE,
        GROUP_RANK,
        GROUP_WORLD_SIZE,
        ROLE_NAME,
        ROLE_RANK,
        ROLE_WORLD_SIZE,
        MASTER_ADDR,
        MASTER_PORT,
        RESTART_COUNT,
        MAX_RESTARTS,
        RUN_ID,
        USE_AGENT_STORE,
        ERROR_FILE,
        NCCL_ASYNC_ERROR_HANDLING,
        OMP_NUM_THREADS,
    ];
}

/// A variable of the contract is missing, malformed or inconsistent with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// The variable is not set. Workers must be started by `ferrun` (or `torchrun`).
    #[error("environment variable {name} is not set; start the worker with `ferrun` (or torchrun), which sets it")]
    Missing {
        /// The variable's name.
        name: &'static str,
    },
    /// The variable is set but its value does not parse.
    #[error("environment variable {name}={value:?} is malformed: expected {expected}")]
    Malformed {
        /// The variable's name.
        name: &'static str,
        /// The value found.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// Two variables contradict each other.
    #[error("environment variables disagree: {name}={value} must be below {bound_name}={bound}")]
    Inconsistent {
        /// The rank-like variable.
        name: &'static str,
        /// Its value.
        value: u32,
        /// The size-like variable that bounds it.
        bound_name: &'static str,
        /// Its value.
        bound: u32,
    },
}

/// Everything a worker learns from its launcher, one field per contract variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Global rank: the node's base rank plus `local_rank`.
    pub rank: u32,
    /// Rank within this node, `0..local_world_size`.
    pub local_rank: u32,
    /// Number of workers in the job (the sum of every node's local world size).
    pub world_size: u32,
    /// Number of workers on this node (`--nproc-per-node`).
    pub local_world_size: u32,
    /// This node's rank in the rendezvous.
    pub group_rank: u32,
    /// Number of nodes in the rendezvous.
    pub group_world_size: u32,
    /// The worker's role (`--role`, `default` by default).
    pub role_name: String,
    /// Rank among workers of the same role (equal to `rank` with a single role).
    pub role_rank: u32,
    /// Number of workers of the same role.
    pub role_world_size: u32,
    /// Host of the store the workers bootstrap through.
    pub master_addr: String,
    /// Port of that store.
    pub master_port: u16,
    /// Restarts of the worker group so far (0 on the first attempt).
    pub restart_count: u32,
    /// Restarts allowed (`--max-restarts`).
    pub max_restarts: u32,
    /// The run id.
    pub run_id: String,
    /// Whether workers connect to the agent's store (`true`) or rank 0 hosts one (`false`).
    pub use_agent_store: bool,
    /// Where the worker writes its error report.
    pub error_file: PathBuf,
    /// `TORCH_NCCL_ASYNC_ERROR_HANDLING`, kept as a string: torch accepts several values.
    pub nccl_async_error_handling: String,
    /// `OMP_NUM_THREADS`, when set.
    pub omp_num_threads: Option<u32>,
}

impl WorkerEnv {
    /// The contract as `(name, value)` pairs, in torchrun's spelling, ready for a child's env.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (vars::RANK, self.rank.to_string()),
            (vars::LOCAL_RANK, self.local_rank.to_string()),
            (vars::WORLD_SIZE, self.world_size.to_string()),
            (vars::LOCAL_WORLD_SIZE, self.local_world_size.to_string()),
            (vars::GROUP_RANK, self.group_rank.to_string()),
            (vars::GROUP_WORLD_SIZE, self.group_world_size.to_string()),
            (vars::ROLE_NAME, self.role_name.clone()),
            (vars::ROLE_RANK, self.role_rank.to_string()),
            (vars::ROLE_WORLD_SIZE, self.role_world_size.to_string()),
            (vars::MASTER_ADDR, self.master_addr.clone()),
            (vars::MASTER_PORT, self.master_port.to_string()),
            (vars::RESTART_COUNT, self.restart_count.to_string()),
            (vars::MAX_RESTARTS, self.max_restarts.to_string()),
            (vars::RUN_ID, self.run_id.clone()),
            (
                vars::USE_AGENT_STORE,
                python_bool(self.use_agent_store).to_owned(),
            ),
            (vars::ERROR_FILE, self.error_file.display().to_string()),
            (
                vars::NCCL_ASYNC_ERROR_HANDLING,
                self.nccl_async_error_handling.clone(),
            ),
        ];
        if let Some(n) = self.omp_num_threads {
            env.push((vars::OMP_NUM_THREADS, n.to_string()));
        }
        env
    }

    /// Reads the contract from this process's environment.
    ///
    /// # Errors
    /// The first variable that is missing, malformed or inconsistent, by name.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the contract through `lookup` (a variable's value, or `None` when unset).
    ///
    /// # Errors
    /// As [`WorkerEnv::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let text = |name: &'static str| lookup(name).ok_or(EnvError::Missing { name });
        let int = |name: &'static str| -> Result<u32, EnvError> {
            let value = text(name)?;
            value.trim().parse().map_err(|_| EnvError::Malformed {
                name,
                value,
                expected: "a non-negative integer",
            })
        };
        let master_port = {
            let value = text(vars::MASTER_PORT)?;
            value.trim().parse().map_err(|_| EnvError::Malformed {
                name: vars::MASTER_PORT,
                value,
                expected: "a TCP port, 0..=65535",
            })?
        };
        let use_agent_store = {
            let value = text(vars::USE_AGENT_STORE)?;
            parse_python_bool(&value).ok_or(EnvError::Malformed {
                name: vars::USE_AGENT_STORE,
                value,
                expected: "True or False",
            })?
        };
        let omp_num_threads = match lookup(vars::OMP_NUM_THREADS) {
            None => None,
            Some(value) => Some(value.trim().parse().map_err(|_| EnvError::Malformed {
                name: vars::OMP_NUM_THREADS,
                value,
                expected: "a positive integer",
            })?),
        };
        let env = Self {
            rank: int(vars::RANK)?,
            local_rank: int(vars::LOCAL_RANK)?,
            world_size: int(vars::WORLD_SIZE)?,
            local_world_size: int(vars::LOCAL_WORLD_SIZE)?,
            group_rank: int(vars::GROUP_RANK)?,
            group_world_size: int(vars::GROUP_WORLD_SIZE)?,
            role_name: text(vars::ROLE_NAME)?,
            role_rank: int(vars::ROLE_RANK)?,
            role_world_size: int(vars::ROLE_WORLD_SIZE)?,
            master_addr: non_empty(vars::MASTER_ADDR, text(vars::MASTER_ADDR)?)?,
            master_port,
            restart_count: int(vars::RESTART_COUNT)?,
            max_restarts: int(vars::MAX_RESTARTS)?,
            run_id: text(vars::RUN_ID)?,
            use_agent_store,
            error_file: PathBuf::from(non_empty(vars::ERROR_FILE, text(vars::ERROR_FILE)?)?),
            nccl_async_error_handling: text(vars::NCCL_ASYNC_ERROR_HANDLING)?,
            omp_num_threads,
        };
        env.check_consistent()?;
        Ok(env)
    }

    fn check_consistent(&self) -> Result<(), EnvError> {
        let pairs = [
            (vars::RANK, self.rank, vars::WORLD_SIZE, self.world_size),
            (
                vars::LOCAL_RANK,
                self.local_rank,
                vars::LOCAL_WORLD_SIZE,
                self.local_world_size,
            ),
            (
                vars::GROUP_RANK,
                self.group_rank,
                vars::GROUP_WORLD_SIZE,
                self.group_world_size,
            ),
            (
                vars::ROLE_RANK,
                self.role_rank,
                vars::ROLE_WORLD_SIZE,
                self.role_world_size,
            ),
        ];
        for (name, value, bound_name, bound) in pairs {
            if value >= bound {
                return Err(EnvError::Inconsistent {
                    name,
                    value,
                    bound_name,
                    bound,
                });
            }
        }
        Ok(())
    }
}

/// Python's `str(bool)`, the spelling torch compares against.
pub fn python_bool(value: bool) -> &'static str {
    if value {
        "True"
    } else {
        "False"
    }
}

fn parse_python_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn non_empty(name: &'static str, value: String) -> Result<String, EnvError> {
    if value.trim().is_empty() {
        Err(EnvError::Malformed {
            name,
            value,
            expected: "a non-empty value",
        })
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn sample() -> WorkerEnv {
        WorkerEnv {
            rank: 3,
            local_rank: 1,
            world_size: 4,
            local_world_size: 2,
            group_rank: 1,
            group_world_size: 2,
            role_name: "default".into(),
            role_rank: 3,
            role_world_size: 4,
            master_addr: "10.1.0.1".into(),
            master_port: 29500,
            restart_count: 2,
            max_restarts: 3,
            run_id: "job-7".into(),
            use_agent_store: true,
            error_file: "/tmp/x/attempt_2/1/error.json".into(),
            nccl_async_error_handling: "1".into(),
            omp_num_threads: Some(1),
        }
    }

    fn as_map(env: &WorkerEnv) -> HashMap<String, String> {
        env.to_env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    #[test]
    fn round_trips_through_the_environment() {
        let env = sample();
        let map = as_map(&env);
        assert_eq!(WorkerEnv::from_lookup(|k| map.get(k).cloned()), Ok(env));
    }

    #[test]
    fn writes_every_contract_variable_in_torchrun_spelling() {
        let map = as_map(&sample());
        for name in vars::ALL {
            assert!(map.contains_key(name), "{name} missing");
        }
        assert_eq!(map[vars::USE_AGENT_STORE], "True");
        assert_eq!(map[vars::MASTER_PORT], "29500");
    }

    #[test]
    fn omp_num_threads_is_optional() {
        let mut env = sample();
        env.omp_num_threads = None;
        let map = as_map(&env);
        assert!(!map.contains_key(vars::OMP_NUM_THREADS));
        assert_eq!(WorkerEnv::from_lookup(|k| map.get(k).cloned()), Ok(env));
    }

    #[test]
    fn names_a_missing_variable() {
        let mut map = as_map(&sample());
        map.remove(vars::LOCAL_WORLD_SIZE);
        let err = WorkerEnv::from_lookup(|k| map.get(k).cloned()).unwrap_err();
        assert_eq!(
            err,
            EnvError::Missing {
                name: vars::LOCAL_WORLD_SIZE
            }
        );
        assert!(err.to_string().contains("LOCAL_WORLD_SIZE is not set"));
    }

    #[test]
    fn names_a_malformed_variable_and_its_value() {
        for (name, bad) in [
            (vars::RANK, "-1"),
            (vars::MASTER_PORT, "70000"),
            (vars::USE_AGENT_STORE, "yes please"),
            (vars::OMP_NUM_THREADS, "many"),
            (vars::MASTER_ADDR, ""),
        ] {
            let mut map = as_map(&sample());
            map.insert(name.to_owned(), bad.to_owned());
            let err = WorkerEnv::from_lookup(|k| map.get(k).cloned()).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, EnvError::Malformed { name: n, .. } if n == name),
                "{message}"
            );
            assert!(message.contains(name) && message.contains(bad), "{message}");
        }
    }

    #[test]
    fn rejects_a_rank_outside_its_world() {
        let mut map = as_map(&sample());
        map.insert(vars::RANK.into(), "4".into());
        let err = WorkerEnv::from_lookup(|k| map.get(k).cloned()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variables disagree: RANK=4 must be below WORLD_SIZE=4"
        );
    }
}

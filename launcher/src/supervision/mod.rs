//! Running the workers: the agent loop, its decisions, the group, one worker.
//!
//! - [`agent`]: the supervision loop: attempts, signals, the exit barrier.
//! - [`decision`]: what the agent does next after an attempt ends, as a pure function.
//! - [`elastic`]: the agent loop of an elastic job: rounds of the rendezvous service.
//! - [`group`]: the workers of an attempt: exit events, stop with grace then SIGKILL.
//! - [`warm`]: pre-started Python interpreters that restarts hand their workers to.
//! - [`worker`]: one worker process: its environment and its binding to the launcher's life.
//! - [`descendants`]: finding every process the workers started, by a mark in their env.
//! - [`keeper`]: the process that kills what a SIGKILLed launcher left running.

pub mod agent;
pub mod decision;
pub mod descendants;
pub mod elastic;
pub mod group;
pub mod keeper;
pub mod warm;
pub mod worker;

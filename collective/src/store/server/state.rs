//! What the store holds: keys, queues, and the waits on them (no I/O).

use std::collections::{HashMap, VecDeque};

use tokio::sync::oneshot;

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) data: HashMap<String, Vec<u8>>,
    pub(super) queues: HashMap<String, VecDeque<Vec<u8>>>,
    /// key → ids of the waits that still need it.
    waiting: HashMap<String, Vec<u64>>,
    waits: HashMap<u64, Wait>,
    next_wait: u64,
}

#[derive(Debug)]
struct Wait {
    missing: usize,
    wake: oneshot::Sender<()>,
}

impl State {
    pub(super) fn present(&self, key: &str) -> bool {
        self.data.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    pub(super) fn set(&mut self, key: String, value: Vec<u8>) {
        self.wake_all(&key);
        self.data.insert(key, value);
    }

    pub(super) fn wake_all(&mut self, key: &str) {
        for id in self.waiting.remove(key).unwrap_or_default() {
            self.satisfy(id);
        }
    }

    /// A queue push completes at most one waiting pop.
    pub(super) fn wake_one(&mut self, key: &str) {
        let Some(ids) = self.waiting.get_mut(key) else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        let id = ids.remove(0);
        if ids.is_empty() {
            self.waiting.remove(key);
        }
        self.satisfy(id);
    }

    pub(super) fn satisfy(&mut self, id: u64) {
        let done = match self.waits.get_mut(&id) {
            Some(w) => {
                w.missing -= 1;
                w.missing == 0
            }
            None => false,
        };
        if done {
            if let Some(w) = self.waits.remove(&id) {
                let _ = w.wake.send(());
            }
        }
    }

    /// Registers a wait for the missing `keys`; `None` when all are present already.
    pub(super) fn wait(&mut self, keys: &[String]) -> Option<(u64, oneshot::Receiver<()>)> {
        let missing: Vec<&String> = keys.iter().filter(|k| !self.present(k)).collect();
        if missing.is_empty() {
            return None;
        }
        let id = self.next_wait;
        self.next_wait += 1;
        let (wake, rx) = oneshot::channel();
        for key in &missing {
            self.waiting.entry((*key).clone()).or_default().push(id);
        }
        self.waits.insert(
            id,
            Wait {
                missing: missing.len(),
                wake,
            },
        );
        Some((id, rx))
    }

    pub(super) fn cancel(&mut self, id: u64) {
        if self.waits.remove(&id).is_some() {
            self.waiting.retain(|_, ids| {
                ids.retain(|&i| i != id);
                !ids.is_empty()
            });
        }
    }

    pub(super) fn add(&mut self, key: String, delta: i64) -> Result<i64, String> {
        let current = match self.data.get(&key) {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| format!("ADD on key {key:?} whose value is not an integer"))?,
        };
        let value = current.wrapping_add(delta);
        self.set(key, value.to_string().into_bytes());
        Ok(value)
    }

    pub(super) fn compare_set(
        &mut self,
        key: String,
        expected: Vec<u8>,
        desired: Vec<u8>,
    ) -> Vec<u8> {
        let current = match self.data.get(&key) {
            None if expected.is_empty() => {
                self.set(key, desired.clone());
                return desired;
            }
            // torch answers the expected value for a missing key; clients rely on it.
            None => expected,
            Some(v) if *v == expected => {
                self.data.insert(key.clone(), desired.clone());
                desired
            }
            Some(v) => v.clone(),
        };
        self.wake_all(&key);
        current
    }
}

//! Request slots (SPEC §10, slow clients). Uploads: a replica handles at most
//! `MAX_CONCURRENT_UPLOADS` at once, and one workspace holds at most
//! `MAX_CONCURRENT_UPLOADS_PER_WORKSPACE` of them, so a flood against one workspace cannot
//! starve the others; a slot is held from the first body byte to the end of the commit (its
//! own task, which a client that goes cannot stop), or of a push workspace's relayed answer.
//! Downloads: `MAX_CONCURRENT_DOWNLOADS` and `MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE` the same
//! way, a slot held while the body streams: a client that stops reading keeps a slice in memory,
//! so without a bound thousands of such clients would hold gigabytes. Long polls:
//! `MAX_LONG_POLLS` and `MAX_LONG_POLLS_PER_WORKSPACE`, a slot held while the request waits
//! (every commit wakes the workspace's waiting polls into a query each). Slots are released by
//! drop, whatever ends the request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use prometheus::IntGauge;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot of the replica is taken.
    Replica,
    /// The workspace holds all of its slots.
    Workspace,
}

#[derive(Clone)]
pub struct Slots {
    replica: Arc<Semaphore>,
    /// Slots held per workspace; an entry exists only while a slot is held, so the map is
    /// never larger than the replica's slot count.
    held: Arc<Mutex<HashMap<Uuid, usize>>>,
    per_workspace: usize,
    /// Counts the slots held (`uploads_in_progress`, `downloads_in_progress`,
    /// `long_polls_waiting`).
    gauge: &'static IntGauge,
}

impl Slots {
    pub fn new(per_replica: usize, per_workspace: usize, gauge: &'static IntGauge) -> Self {
        Slots {
            replica: Arc::new(Semaphore::new(per_replica.max(1))),
            held: Arc::new(Mutex::new(HashMap::new())),
            per_workspace: per_workspace.max(1),
            gauge,
        }
    }

    /// Whether [`acquire`](Self::acquire) would refuse this workspace now: a request that
    /// is to be refused skips work it would have done before asking (a moment later the
    /// answer may differ; `acquire` decides).
    pub fn would_refuse(&self, workspace_id: Uuid) -> bool {
        let full = self.held.lock().map_or(true, |held| {
            held.get(&workspace_id) >= Some(&self.per_workspace)
        });
        full || self.replica.available_permits() == 0
    }

    pub fn acquire(&self, workspace_id: Uuid) -> Result<Slot, Refused> {
        {
            let mut held = self.held.lock().map_err(|_| Refused::Replica)?;
            let n = held.entry(workspace_id).or_insert(0);
            if *n >= self.per_workspace {
                return Err(Refused::Workspace);
            }
            *n += 1;
        }
        let Ok(permit) = self.replica.clone().try_acquire_owned() else {
            release(&self.held, workspace_id);
            return Err(Refused::Replica);
        };
        self.gauge.inc();
        Ok(Slot {
            _permit: permit,
            workspace_id,
            held: self.held.clone(),
            gauge: self.gauge,
        })
    }
}

fn release(held: &Mutex<HashMap<Uuid, usize>>, workspace_id: Uuid) {
    if let Ok(mut held) = held.lock() {
        if let Some(n) = held.get_mut(&workspace_id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&workspace_id);
            }
        }
    }
}

/// One held slot; counted in its gauge while held.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    workspace_id: Uuid,
    held: Arc<Mutex<HashMap<Uuid, usize>>>,
    gauge: &'static IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
        release(&self.held, self.workspace_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_workspace_and_per_replica_bounds() {
        let slots = Slots::new(3, 2, &crate::metrics::metrics().uploads_in_progress);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let a1 = slots.acquire(a).unwrap();
        assert!(!slots.would_refuse(a));
        let _a2 = slots.acquire(a).unwrap();
        assert!(slots.would_refuse(a) && !slots.would_refuse(b));
        assert_eq!(slots.acquire(a).err(), Some(Refused::Workspace));
        let _b1 = slots.acquire(b).unwrap();
        assert!(slots.would_refuse(b));
        assert_eq!(slots.acquire(b).err(), Some(Refused::Replica));
        drop(a1);
        assert!(!slots.would_refuse(a) && !slots.would_refuse(b));
        let _b2 = slots.acquire(b).unwrap();
        assert_eq!(slots.held.lock().unwrap().len(), 2);
        drop(_b2);
        drop(_b1);
        assert_eq!(
            slots.held.lock().unwrap().get(&b),
            None,
            "no entry once released"
        );
    }
}

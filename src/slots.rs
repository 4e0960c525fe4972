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
//!
//! Registration is open, so a workspace bound alone does not stop one client that registers
//! many workspaces from taking every slot of a replica (16 workspaces fill 64 upload slots,
//! each trickling at the minimum rate for hours). A client address therefore holds at most
//! `SLOT_SHARE_PER_CLIENT` percent of each kind (the caller decides which requests count).

use std::{
    collections::HashMap,
    net::IpAddr,
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
    /// The client address holds its share of the replica's slots.
    Client,
}

/// Who a slot is counted against: a workspace across the kinds that share its bound
/// ([`Slots::sharing_workspaces`]), a client per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    Workspace(Uuid),
    Client(u32, IpAddr),
}

/// Each [`Slots`] its own kind: clients are counted per kind, also in a map kinds share.
static KINDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[derive(Clone)]
pub struct Slots {
    replica: Arc<Semaphore>,
    /// Slots held per workspace and per client; an entry exists only while a slot is held, so
    /// the map is never larger than twice the slot count of the kinds sharing it.
    held: Arc<Mutex<HashMap<Holder, usize>>>,
    per_workspace: usize,
    per_client: usize,
    /// Which of the kinds sharing `held` these are (their clients are counted apart).
    kind: u32,
    /// Counts the slots held (`uploads_in_progress`, `downloads_in_progress`,
    /// `long_polls_waiting`).
    gauge: &'static IntGauge,
}

impl Slots {
    /// `client_share`: the percent of `per_replica` one client may hold (at least one slot).
    pub fn new(
        per_replica: usize,
        per_workspace: usize,
        client_share: u64,
        gauge: &'static IntGauge,
    ) -> Self {
        let per_replica = per_replica.max(1);
        let per_client = (per_replica as u64).saturating_mul(client_share.min(100)) / 100;
        Slots {
            replica: Arc::new(Semaphore::new(per_replica)),
            held: Arc::new(Mutex::new(HashMap::new())),
            per_workspace: per_workspace.max(1),
            per_client: (per_client as usize).max(1),
            kind: KINDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            gauge,
        }
    }

    /// Slots of another kind, with a replica bound and client share of their own, whose
    /// workspaces count against these slots' per-workspace bound together with them: relays
    /// to push workspaces and staged uploads, which MAX_CONCURRENT_UPLOADS_PER_WORKSPACE
    /// bounds together. Apart, a workspace switched between poll and push (its own token
    /// re-registers it at once) held both kinds' worth (a review: 8 of a bound of 4).
    pub fn sharing_workspaces(
        &self,
        per_replica: usize,
        client_share: u64,
        gauge: &'static IntGauge,
    ) -> Self {
        Slots {
            held: self.held.clone(),
            ..Slots::new(per_replica, self.per_workspace, client_share, gauge)
        }
    }

    /// Whether [`acquire`](Self::acquire) would refuse this workspace and client now: a
    /// request that is to be refused skips work it would have done before asking (a moment
    /// later the answer may differ; `acquire` decides).
    pub fn would_refuse(&self, workspace_id: Uuid, client: Option<IpAddr>) -> bool {
        let refused = self.held.lock().map_or(Some(Refused::Replica), |held| {
            let holders = [
                Some(Holder::Workspace(workspace_id)),
                client.map(|ip| Holder::Client(self.kind, ip)),
            ];
            self.over_a_bound(&held, holders)
        });
        refused.is_some() || self.replica.available_permits() == 0
    }

    /// A slot for a request of `workspace_id` from `client` (`None`: a client not counted).
    pub fn acquire(&self, workspace_id: Uuid, client: Option<IpAddr>) -> Result<Slot, Refused> {
        self.take(Some(workspace_id), client)
    }

    /// A slot that is no workspace's (the replica's registration lookups), counted against
    /// `client` alone.
    pub fn acquire_for(&self, client: Option<IpAddr>) -> Result<Slot, Refused> {
        self.take(None, client)
    }

    fn take(&self, workspace_id: Option<Uuid>, client: Option<IpAddr>) -> Result<Slot, Refused> {
        let holders = [
            workspace_id.map(Holder::Workspace),
            client.map(|ip| Holder::Client(self.kind, ip)),
        ];
        {
            let mut held = self.held.lock().map_err(|_| Refused::Replica)?;
            if let Some(refused) = self.over_a_bound(&held, holders) {
                return Err(refused);
            }
            for holder in holders.into_iter().flatten() {
                *held.entry(holder).or_insert(0) += 1;
            }
        }
        let Ok(permit) = self.replica.clone().try_acquire_owned() else {
            release(&self.held, holders);
            return Err(Refused::Replica);
        };
        self.gauge.inc();
        Ok(Slot {
            _permit: permit,
            holders,
            held: self.held.clone(),
            gauge: self.gauge,
        })
    }

    /// The bound the next slot for `holders` would pass, if any.
    fn over_a_bound(
        &self,
        held: &HashMap<Holder, usize>,
        holders: [Option<Holder>; 2],
    ) -> Option<Refused> {
        holders.into_iter().flatten().find_map(|holder| {
            let (bound, refused) = match holder {
                Holder::Workspace(_) => (self.per_workspace, Refused::Workspace),
                Holder::Client(..) => (self.per_client, Refused::Client),
            };
            (held.get(&holder).copied().unwrap_or(0) >= bound).then_some(refused)
        })
    }
}

fn release(held: &Mutex<HashMap<Holder, usize>>, holders: [Option<Holder>; 2]) {
    let Ok(mut held) = held.lock() else { return };
    for holder in holders.into_iter().flatten() {
        if let Some(n) = held.get_mut(&holder) {
            *n -= 1;
            if *n == 0 {
                held.remove(&holder);
            }
        }
    }
}

/// One held slot; counted in its gauge while held.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    holders: [Option<Holder>; 2],
    held: Arc<Mutex<HashMap<Holder, usize>>>,
    gauge: &'static IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
        release(&self.held, self.holders);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_workspace_and_per_replica_bounds() {
        let slots = Slots::new(3, 2, 100, &crate::metrics::metrics().uploads_in_progress);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let a1 = slots.acquire(a, None).unwrap();
        assert!(!slots.would_refuse(a, None));
        let _a2 = slots.acquire(a, None).unwrap();
        assert!(slots.would_refuse(a, None) && !slots.would_refuse(b, None));
        assert_eq!(slots.acquire(a, None).err(), Some(Refused::Workspace));
        let _b1 = slots.acquire(b, None).unwrap();
        assert!(slots.would_refuse(b, None));
        assert_eq!(slots.acquire(b, None).err(), Some(Refused::Replica));
        drop(a1);
        assert!(!slots.would_refuse(a, None) && !slots.would_refuse(b, None));
        let _b2 = slots.acquire(b, None).unwrap();
        assert_eq!(slots.held.lock().unwrap().len(), 2);
        drop(_b2);
        drop(_b1);
        assert_eq!(
            slots.held.lock().unwrap().get(&Holder::Workspace(b)),
            None,
            "no entry once released"
        );
    }

    #[test]
    fn a_client_holds_its_share_across_workspaces() {
        // 25 % of 8: two slots per client, whatever the workspace.
        let slots = Slots::new(8, 4, 25, &crate::metrics::metrics().uploads_in_progress);
        let (one, other): (IpAddr, IpAddr) = (
            "203.0.113.1".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
        );
        let ws = || Uuid::new_v4();
        let first = slots.acquire(ws(), Some(one)).unwrap();
        let _second = slots.acquire(ws(), Some(one)).unwrap();
        let third = ws();
        assert!(slots.would_refuse(third, Some(one)));
        assert_eq!(slots.acquire(third, Some(one)).err(), Some(Refused::Client));
        assert!(!slots.would_refuse(third, Some(other)));
        let _theirs = slots.acquire(third, Some(other)).unwrap();
        let _uncounted: Vec<_> = (0..4).map(|_| slots.acquire(ws(), None).unwrap()).collect();
        let _eighth = slots.acquire(ws(), Some(other)).unwrap();
        assert_eq!(
            slots.acquire(ws(), Some(other)).err(),
            Some(Refused::Client)
        );
        assert_eq!(slots.acquire(ws(), None).err(), Some(Refused::Replica));
        drop(first);
        let _again = slots.acquire(ws(), Some(one)).expect("its slot came back");
        let held = slots.held.lock().unwrap();
        assert_eq!(held.get(&Holder::Client(slots.kind, one)), Some(&2));
        assert_eq!(held.len(), 8 + 2, "refusals left no count behind");
        drop(held);
        assert_eq!(
            Slots::new(3, 3, 1, &crate::metrics::metrics().uploads_in_progress).per_client,
            1
        );
    }

    #[test]
    fn kinds_sharing_workspaces_bound_a_workspace_together_and_clients_apart() {
        let gauge = &crate::metrics::metrics().uploads_in_progress;
        let staged = Slots::new(8, 2, 25, gauge);
        let relayed = staged.sharing_workspaces(4, 25, gauge);
        let (ws, client): (Uuid, IpAddr) = (Uuid::new_v4(), "203.0.113.1".parse().unwrap());
        let _one = staged.acquire(ws, None).unwrap();
        let _two = relayed.acquire(ws, Some(client)).unwrap();
        assert_eq!(relayed.acquire(ws, None).err(), Some(Refused::Workspace));
        assert_eq!(staged.acquire(ws, None).err(), Some(Refused::Workspace));
        // A client's share is per kind: 2 of 8 staged, 1 of 4 relayed.
        let _its_staged = staged.acquire(Uuid::new_v4(), Some(client)).unwrap();
        assert_eq!(
            relayed.acquire(Uuid::new_v4(), Some(client)).err(),
            Some(Refused::Client)
        );
        // Each kind its own replica bound.
        let _rest: Vec<_> = (0..3)
            .map(|_| relayed.acquire(Uuid::new_v4(), None).unwrap())
            .collect();
        assert_eq!(
            relayed.acquire(Uuid::new_v4(), None).err(),
            Some(Refused::Replica)
        );
        assert!(staged.acquire(Uuid::new_v4(), None).is_ok());
    }
}

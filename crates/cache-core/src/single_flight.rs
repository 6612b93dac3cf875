//! In-process request coalescing: for each key at most one piece of work runs, and
//! every other caller waits for its result.
//!
//! The leader's work usually runs in a spawned task so it outlives the request that
//! started it (a request may give up waiting and answer a fallback while the
//! generation finishes and is cached). The result travels on a `watch` channel;
//! a leader dropped without completing (a panic, a cancelled task) closes the channel,
//! and its followers see `None` instead of waiting forever.
//!
//! Before its result, a leader may *claim* the work ([`Leader::claim`]): say that it is
//! now visible beyond this process (a fill lock taken, a job queued), so that a caller
//! answering "pending" ([`Follower::claimed`]) is not ahead of the truth.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

#[derive(Debug)]
pub struct SingleFlight<K, V> {
    flights: Arc<Mutex<HashMap<K, watch::Receiver<Stage<V>>>>>,
}

/// Where a flight is.
#[derive(Debug, Clone)]
enum Stage<V> {
    Started,
    Claimed,
    Done(V),
}

impl<K, V> Clone for SingleFlight<K, V> {
    fn clone(&self) -> Self {
        Self {
            flights: Arc::clone(&self.flights),
        }
    }
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            flights: Arc::default(),
        }
    }
}

/// What [`SingleFlight::join`] made of the caller.
#[derive(Debug)]
pub enum Flight<K: Eq + Hash, V> {
    /// Nobody was working on the key: the caller must do the work and complete it.
    Leader(Leader<K, V>),
    /// Someone is: wait for their result.
    Follower(Follower<V>),
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn join(&self, key: &K) -> Flight<K, V> {
        let mut flights = self.lock();
        if let Some(receiver) = flights.get(key) {
            return Flight::Follower(Follower {
                receiver: receiver.clone(),
            });
        }
        let (sender, receiver) = watch::channel(Stage::Started);
        flights.insert(key.clone(), receiver);
        Flight::Leader(Leader {
            flights: self.clone(),
            key: key.clone(),
            sender,
        })
    }

    /// Waits on the flight for `key` if there is one.
    pub fn follow(&self, key: &K) -> Option<Follower<V>> {
        self.lock().get(key).map(|receiver| Follower {
            receiver: receiver.clone(),
        })
    }

    pub fn in_flight(&self, key: &K) -> bool {
        self.lock().contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, watch::Receiver<Stage<V>>>> {
        // The map is only ever left consistent; a panic elsewhere does not taint it.
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
pub struct Leader<K: Eq + Hash, V> {
    flights: SingleFlight<K, V>,
    key: K,
    sender: watch::Sender<Stage<V>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Leader<K, V> {
    /// A follower of this leader's own flight, for the request that started it.
    pub fn follower(&self) -> Follower<V> {
        Follower {
            receiver: self.sender.subscribe(),
        }
    }

    /// Publishes the result to every follower and ends the flight. Callers store the
    /// result where later requests look first *before* completing, so that nobody can
    /// find neither the flight nor the result.
    pub fn complete(self, value: V) {
        self.sender.send_replace(Stage::Done(value));
        // Dropping `self` ends the flight.
    }

    /// Tells followers waiting in [`Follower::claimed`] that the work is visible
    /// beyond this process now. Idempotent; a no-op once complete.
    pub fn claim(&self) {
        self.sender.send_if_modified(|stage| match stage {
            Stage::Started => {
                *stage = Stage::Claimed;
                true
            }
            Stage::Claimed | Stage::Done(_) => false,
        });
    }
}

impl<K: Eq + Hash, V> Drop for Leader<K, V> {
    fn drop(&mut self) {
        self.flights
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

#[derive(Debug, Clone)]
pub struct Follower<V> {
    receiver: watch::Receiver<Stage<V>>,
}

impl<V: Clone> Follower<V> {
    /// The leader's result, or `None` if the leader was dropped without one.
    pub async fn wait(mut self) -> Option<V> {
        match self
            .receiver
            .wait_for(|stage| matches!(stage, Stage::Done(_)))
            .await
            .as_deref()
        {
            Ok(Stage::Done(value)) => Some(value.clone()),
            _ => None,
        }
    }

    /// Waits until the leader has claimed the work or finished it; `false` if the
    /// leader was dropped first.
    pub async fn claimed(&mut self) -> bool {
        self.receiver
            .wait_for(|stage| !matches!(stage, Stage::Started))
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_followers() {
        let flights: SingleFlight<&str, u32> = SingleFlight::new();
        let Flight::Leader(leader) = flights.join(&"k") else {
            panic!("first caller leads")
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match flights.join(&"k") {
                Flight::Follower(f) => tokio::spawn(f.wait()),
                Flight::Leader(_) => panic!("second caller must follow"),
            })
            .collect();
        assert!(flights.in_flight(&"k"));
        leader.complete(7);
        for follower in followers {
            assert_eq!(follower.await.expect("joined"), Some(7));
        }
        assert!(flights.is_empty());
        assert!(
            matches!(flights.join(&"k"), Flight::Leader(_)),
            "a finished flight starts afresh"
        );
    }

    #[tokio::test]
    async fn dropped_leader_releases_followers_with_none() {
        let flights: SingleFlight<&str, u32> = SingleFlight::new();
        let leader = flights.join(&"k");
        let Flight::Follower(follower) = flights.join(&"k") else {
            panic!("must follow")
        };
        drop(leader);
        assert_eq!(follower.wait().await, None);
        assert!(!flights.in_flight(&"k"));
    }

    #[tokio::test]
    async fn a_follower_that_joins_late_still_sees_the_value() {
        let flights: SingleFlight<&str, u32> = SingleFlight::new();
        let Flight::Leader(leader) = flights.join(&"k") else {
            panic!("leads")
        };
        let own = leader.follower();
        leader.complete(3);
        assert_eq!(own.wait().await, Some(3));
    }

    #[tokio::test]
    async fn a_claim_is_seen_before_the_result_and_a_result_counts_as_claimed() {
        let flights: SingleFlight<&str, u32> = SingleFlight::new();
        let Flight::Leader(leader) = flights.join(&"k") else {
            panic!("leads")
        };
        let mut early = leader.follower();
        let waiting = tokio::spawn(async move { early.claimed().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing claimed yet");
        leader.claim();
        assert!(waiting.await.expect("joined"));
        let mut late = leader.follower();
        leader.complete(1);
        assert!(late.claimed().await, "done counts as claimed");
        let Flight::Leader(dropped) = flights.join(&"j") else {
            panic!("leads")
        };
        let mut orphan = dropped.follower();
        drop(dropped);
        assert!(!orphan.claimed().await, "a dropped leader claimed nothing");
    }
}

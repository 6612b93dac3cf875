//! The generation job: versioned JSON carrying the key, the canonical profile (never a
//! user id), the fill lock's token, what triggered it, the request id for tracing, and
//! when it was enqueued. Persistent, and enqueued only once the broker confirms it.

use serde::{Deserialize, Serialize};

use crate::amqp::Topology;
use crate::topology::{JOBS, PREWARM};

/// The job format this build writes; readers refuse versions they do not know.
pub const JOB_VERSION: u32 = 1;

/// What a generation is for; jobs and generation events carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// A request found nothing.
    Miss,
    /// A stale entry (or `no-cache`) asked for a new one.
    Refresh,
    /// Pre-warming ahead of demand.
    Prewarm,
}

impl Trigger {
    pub const ALL: [Self; 3] = [Self::Miss, Self::Refresh, Self::Prewarm];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Miss => "miss",
            Self::Refresh => "refresh",
            Self::Prewarm => "prewarm",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Job {
    pub version: u32,
    pub key: String,
    /// The canonical profile's exact JSON (what the key's digest covers).
    pub canonical: String,
    /// The fill lock the publisher took, which the worker adopts. Empty for pre-warm
    /// jobs: they hold no lock while they wait, and the worker takes it when it starts.
    pub lock_token: String,
    pub trigger: Trigger,
    pub request_id: String,
    pub enqueued_at_ms: i64,
}

/// A message that is not a job this build can carry out.
#[derive(Debug, thiserror::Error)]
#[error("not a job this worker can read: {0}")]
pub struct MalformedJob(pub String);

impl Job {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MalformedJob> {
        let job: Self = serde_json::from_slice(bytes).map_err(|e| MalformedJob(e.to_string()))?;
        if job.version != JOB_VERSION {
            return Err(MalformedJob(format!(
                "job version {} (this build reads {JOB_VERSION})",
                job.version
            )));
        }
        Ok(job)
    }

    /// The queue it goes to: pre-warm jobs have their own.
    pub fn topology(&self) -> Topology {
        match self.trigger {
            Trigger::Prewarm => PREWARM,
            Trigger::Miss | Trigger::Refresh => JOBS,
        }
    }
}

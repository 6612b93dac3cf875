//! Publishing generation jobs from the gateway: one connection and confirm-mode channel
//! per process, made lazily and remade after a failure. After a failure, publishing
//! fails at once for a few seconds, so a broker that is down costs misses nothing but
//! the in-process generation they fall back to.

use std::time::{Duration, Instant};

use generator_worker::queue::{self, Job, QueueError, QueueSettings};
use lapin::{Channel, Connection};
use tokio::sync::Mutex;

#[derive(Debug)]
pub struct JobPublisher {
    settings: QueueSettings,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    link: Option<(Connection, Channel)>,
    failed_at: Option<Instant>,
}

/// How long publishing fails fast after a failure before trying the broker again.
const RETRY_AFTER: Duration = Duration::from_secs(3);

impl JobPublisher {
    pub fn new(settings: QueueSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::default()),
        }
    }

    /// Publishes and waits for the broker's confirm; an error means the job may not be
    /// enqueued, and the caller generates in process instead.
    pub async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        let mut state = self.state.lock().await;
        if state.failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
            return Err(QueueError::Unreachable(
                "broker recently unreachable".to_owned(),
            ));
        }
        let result = self.publish_on(&mut state, job).await;
        if result.is_err() {
            state.link = None;
            state.failed_at = Some(Instant::now());
        } else {
            state.failed_at = None;
        }
        result
    }

    async fn publish_on(&self, state: &mut State, job: &Job) -> Result<(), QueueError> {
        if !state.link.as_ref().is_some_and(|(connection, channel)| {
            connection.status().connected() && channel.status().connected()
        }) {
            let connection =
                queue::connect(&self.settings.url, self.settings.confirm_timeout).await?;
            let channel = queue::publishing_channel(&connection, &self.settings).await?;
            state.link = Some((connection, channel));
        }
        let Some((_, channel)) = &state.link else {
            unreachable!("link set above")
        };
        queue::publish(channel, job, self.settings.confirm_timeout).await
    }

    pub async fn is_connected(&self) -> bool {
        match self.state.try_lock() {
            Ok(state) => state
                .link
                .as_ref()
                .is_some_and(|(connection, _)| connection.status().connected()),
            // Someone is publishing right now: the link is in use.
            Err(_) => true,
        }
    }
}

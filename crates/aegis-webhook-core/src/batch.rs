//! Group commit: many concurrent callers' requests answered by one round trip.
//!
//! A [`Batcher`] takes requests one at a time from any number of tasks and runs
//! them in batches: when a batch starts it takes every request waiting (up to a
//! maximum), so under load batches grow by themselves while a lone request never
//! waits for company. This is what lets one database statement claim, and one
//! transaction record, the deliveries of many in-flight attempts.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

type Reply<O> = oneshot::Sender<Result<O, Failure>>;

/// Why a batch gave no answer.
#[derive(Clone)]
enum Failure {
    Failed(Arc<anyhow::Error>),
    /// Its run panicked, with this text: a bug, raised again in every
    /// caller's task, where its supervision sees it (a role's message task,
    /// see `queue::consume::MessageTasks`), rather than answered as an
    /// error that the caller would retry for ever.
    Panicked(Arc<str>),
}

struct Request<I, O> {
    input: I,
    reply: Reply<O>,
}

/// Runs requests of type `I` in batches, answering each with an `O`.
pub struct Batcher<I, O> {
    name: &'static str,
    requests: mpsc::UnboundedSender<Request<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher {
            name: self.name,
            requests: self.requests.clone(),
        }
    }
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the batcher on the current tokio runtime. `run` gets up to
    /// `max_batch` inputs and must answer each, in order; at most `parallel`
    /// batches run at once (more requests wait and join the next batch). It
    /// stops when the last clone is dropped.
    pub fn spawn<F, Fut>(name: &'static str, max_batch: usize, parallel: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Vec<O>>> + Send + 'static,
    {
        let (requests, mut waiting) = mpsc::unbounded_channel::<Request<I, O>>();
        let run = Arc::new(run);
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        let max_batch = max_batch.max(1);
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                // Requests that arrive while every slot is busy join this batch.
                let slot = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                // Let the tasks that are ready to run make their requests first:
                // woken together (responses arriving, a batch answered), they
                // would otherwise trickle into batches of one. It costs no time
                // when nothing else is ready.
                tokio::task::yield_now().await;
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match waiting.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                let run = run.clone();
                tokio::spawn(async move {
                    use futures::FutureExt as _;
                    let (inputs, replies): (Vec<I>, Vec<Reply<O>>) =
                        batch.into_iter().map(|request| (request.input, request.reply)).unzip();
                    let asked = inputs.len();
                    let started = std::time::Instant::now();
                    let result = match std::panic::AssertUnwindSafe(async move { run(inputs).await })
                        .catch_unwind()
                        .await
                    {
                        Ok(result) => result,
                        Err(panic) => {
                            let text: Arc<str> = crate::telemetry::panic_text(&*panic).into();
                            for reply in replies {
                                let _ = reply.send(Err(Failure::Panicked(text.clone())));
                            }
                            drop(slot);
                            return;
                        }
                    };
                    tracing::trace!(
                        batcher = name,
                        size = asked,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "batch ran"
                    );
                    match result {
                        Ok(outputs) if outputs.len() == asked => {
                            for (reply, output) in replies.into_iter().zip(outputs) {
                                // A caller that stopped waiting needs no answer.
                                let _ = reply.send(Ok(output));
                            }
                        }
                        Ok(outputs) => {
                            let error = Failure::Failed(Arc::new(anyhow::anyhow!(
                                "{name}: a batch of {asked} requests got {} answers",
                                outputs.len()
                            )));
                            for reply in replies {
                                let _ = reply.send(Err(error.clone()));
                            }
                        }
                        Err(error) => {
                            let error = Failure::Failed(Arc::new(error));
                            for reply in replies {
                                let _ = reply.send(Err(error.clone()));
                            }
                        }
                    }
                    drop(slot);
                });
            }
        });
        Batcher { name, requests }
    }

    /// Runs `input` in the next batch and returns its answer; the batch's error
    /// if the whole batch failed.
    ///
    /// # Panics
    /// If the batch's run panicked (see `Failure::Panicked`).
    pub async fn call(&self, input: I) -> anyhow::Result<O> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { input, reply })
            .map_err(|_| anyhow::anyhow!("{}: the batcher has stopped", self.name))?;
        match answer.await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(Failure::Failed(error))) => Err(anyhow::anyhow!("{}: {error:#}", self.name)),
            Ok(Err(Failure::Panicked(text))) => panic!("{}: the batch panicked: {text}", self.name),
            Err(_) => Err(anyhow::anyhow!("{}: the batch was abandoned", self.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_each_gets_its_own_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let recorded = sizes.clone();
        let doubler = Batcher::spawn("doubler", 16, 1, move |inputs: Vec<u32>| {
            recorded.lock().unwrap().push(inputs.len());
            async move {
                // Slow enough that the other requests queue behind the first batch.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(inputs.into_iter().map(|n| n * 2).collect())
            }
        });
        let answers = futures::future::join_all((0..40).map(|n| {
            let doubler = doubler.clone();
            async move { doubler.call(n).await.unwrap() }
        }))
        .await;
        assert_eq!(answers, (0..40).map(|n| n * 2).collect::<Vec<_>>());
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|size| *size <= 16), "{sizes:?}");
        assert!(
            sizes.len() < 40,
            "requests waiting together must share a batch: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_that_panics_panics_in_every_caller_and_the_next_batch_runs() {
        let buggy = Batcher::spawn("buggy", 8, 1, |inputs: Vec<u32>| async move {
            assert!(!inputs.contains(&13), "a bug");
            Ok(inputs)
        });
        let calling = tokio::spawn({
            let buggy = buggy.clone();
            async move { buggy.call(13).await }
        });
        let error = calling.await.expect_err("the caller panicked");
        assert!(error.is_panic());
        assert_eq!(buggy.call(1).await.expect("the next batch runs"), 1);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_request_in_it_and_the_next_batch_runs() {
        let flaky = Batcher::spawn("flaky", 8, 1, |inputs: Vec<u32>| async move {
            if inputs.contains(&13) {
                anyhow::bail!("unlucky batch");
            }
            Ok(inputs)
        });
        let error = flaky.call(13).await.unwrap_err();
        assert!(format!("{error:#}").contains("unlucky batch"), "{error:#}");
        assert_eq!(flaky.call(7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_batch_answering_the_wrong_number_of_requests_is_an_error() {
        let lossy = Batcher::spawn("lossy", 8, 1, |_inputs: Vec<u32>| async move { Ok(Vec::<u32>::new()) });
        let error = lossy.call(1).await.unwrap_err();
        assert!(format!("{error:#}").contains("got 0 answers"), "{error:#}");
    }
}

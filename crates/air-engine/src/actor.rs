//! The scheduler actor (one per loaded model): takes submissions and cancellations, hands each
//! step's plan to the compute thread, and turns sampled tokens into each request's events.

use crate::request::{EngineError, Event, FinishReason, Request, RequestTimings, Usage};
use crate::runner::{Runner, RunnerMsg, Sampled, SeqSetup, StepResult};
use crate::scheduler::{Scheduler, SchedulerStats, SeqId, StepPlan};
use crate::stop::StopText;
use air_tokenizer::{StreamDecoder, Tokenizer};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Messages of the scheduler actor.
pub enum SchedulerMsg {
    Submit(Box<Request>, UnboundedSender<Event>, RpcReplyPort<Result<SeqId, EngineError>>),
    /// The client is gone: end the request and free its blocks.
    Cancel(SeqId),
    /// The compute thread finished a step.
    StepDone(StepPlan, StepResult),
    Stats(RpcReplyPort<SchedulerStats>),
}

/// What the scheduler actor starts from.
pub(crate) struct SchedulerArgs {
    pub scheduler: Scheduler,
    pub runner: Runner,
    pub tokenizer: Arc<Tokenizer>,
    pub vocab_size: usize,
    pub context_length: usize,
}

/// A request's side: where its events go and how its text is cut.
struct Client {
    events: UnboundedSender<Event>,
    decoder: StreamDecoder,
    text: StopText,
    prompt_len: usize,
    max_tokens: usize,
    ignore_eos: bool,
    generated: usize,
    submitted: Instant,
    first_token: Option<Instant>,
}

pub(crate) struct SchedulerState {
    scheduler: Scheduler,
    runner: mpsc::Sender<RunnerMsg>,
    /// The compute thread, joined when the actor stops (it owns the model and its device).
    compute: Option<std::thread::JoinHandle<()>>,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    context_length: usize,
    clients: HashMap<SeqId, Client>,
    next_id: SeqId,
    in_flight: bool,
    /// Cancellations that arrived during a step, applied after it.
    cancelled: Vec<SeqId>,
    /// The compute thread's time in the model's passes and in sampling, over all steps.
    forward_time: Duration,
    sampling_time: Duration,
}

pub(crate) struct SchedulerActor;

impl Actor for SchedulerActor {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SchedulerMsg>,
        args: SchedulerArgs,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        let me = myself.clone();
        let (runner, compute) =
            args.runner.spawn(move |plan, result| me.cast(SchedulerMsg::StepDone(plan, result)).is_ok())?;
        Ok(SchedulerState {
            scheduler: args.scheduler,
            runner,
            compute: Some(compute),
            tokenizer: args.tokenizer,
            vocab_size: args.vocab_size,
            context_length: args.context_length,
            clients: HashMap::new(),
            next_id: 0,
            in_flight: false,
            cancelled: Vec::new(),
            forward_time: Duration::ZERO,
            sampling_time: Duration::ZERO,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Submit(request, events, reply) => {
                let _ = reply.send(state.submit(*request, events));
            }
            SchedulerMsg::Cancel(id) => {
                if state.in_flight {
                    state.cancelled.push(id);
                } else {
                    state.end(id, FinishReason::Cancelled);
                }
            }
            SchedulerMsg::StepDone(plan, result) => {
                state.in_flight = false;
                state.step_done(plan, result);
                for id in std::mem::take(&mut state.cancelled) {
                    state.end(id, FinishReason::Cancelled);
                }
            }
            SchedulerMsg::Stats(reply) => {
                let stats = SchedulerStats {
                    forward_time: state.forward_time,
                    sampling_time: state.sampling_time,
                    ..state.scheduler.stats()
                };
                let _ = reply.send(stats);
            }
        }
        state.kick()?;
        Ok(())
    }

    /// Ends every request, then stops the compute thread and waits for it, so that the model
    /// (and a GPU context) is released before the process may exit.
    async fn post_stop(
        &self,
        _myself: ActorRef<SchedulerMsg>,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        let ids: Vec<SeqId> = state.clients.keys().copied().collect();
        for id in ids {
            state.end(id, FinishReason::Error("the engine stopped".into()));
        }
        state.runner = mpsc::channel().0;
        if let Some(thread) = state.compute.take() {
            tokio::task::spawn_blocking(move || thread.join()).await.ok();
        }
        Ok(())
    }
}

impl SchedulerState {
    fn submit(&mut self, request: Request, events: UnboundedSender<Event>) -> Result<SeqId, EngineError> {
        let prompt_len = request.prompt.len();
        if prompt_len == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt_len >= self.context_length {
            return Err(EngineError::PromptTooLong { prompt: prompt_len, context: self.context_length });
        }
        if let Some(&id) = request.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::TokenOutOfRange { id, vocab: self.vocab_size });
        }
        request.sampling.validate().map_err(|e| EngineError::Invalid(e.to_string()))?;
        let max_tokens = request.max_tokens.min(self.context_length - prompt_len);
        let id = self.next_id;
        let max_len = prompt_len + max_tokens;
        self.scheduler.admit(id, request.prompt, max_len)?;
        self.next_id += 1;
        let setup = SeqSetup { id, max_len, sampling: request.sampling, logprobs: request.logprobs };
        if self.runner.send(RunnerMsg::Setup(setup)).is_err() {
            self.scheduler.finish(id);
            return Err(EngineError::Stopped);
        }
        self.clients.insert(
            id,
            Client {
                events,
                decoder: StreamDecoder::new(),
                text: StopText::new(request.stop),
                prompt_len,
                max_tokens,
                ignore_eos: request.ignore_eos,
                generated: 0,
                submitted: Instant::now(),
                first_token: None,
            },
        );
        if max_tokens == 0 {
            self.end(id, FinishReason::Length);
        }
        Ok(id)
    }

    /// Starts the next step when none is running and there is work.
    fn kick(&mut self) -> Result<(), ActorProcessingErr> {
        if self.in_flight {
            return Ok(());
        }
        if let Some(plan) = self.scheduler.plan() {
            self.runner.send(RunnerMsg::Step(plan)).map_err(|_| "the compute thread has stopped")?;
            self.in_flight = true;
        }
        Ok(())
    }

    fn step_done(&mut self, plan: StepPlan, result: StepResult) {
        self.scheduler.complete(&plan);
        let sampled = match result {
            Ok((sampled, times)) => {
                self.forward_time += times.forward;
                self.sampling_time += times.sampling;
                sampled
            }
            Err(e) => {
                tracing::error!(error = %e, "step failed");
                for entry in &plan.entries {
                    self.end(entry.id, FinishReason::Error(e.clone()));
                }
                return;
            }
        };
        for s in sampled {
            if let Some((id, reason)) = self.on_token(s) {
                self.end(id, reason);
            }
        }
    }

    /// Delivers a sampled token; returns why the request ends now, if it does.
    fn on_token(&mut self, s: Sampled) -> Option<(SeqId, FinishReason)> {
        let client = self.clients.get_mut(&s.id)?;
        client.first_token.get_or_insert_with(Instant::now);
        if !client.ignore_eos && self.tokenizer.is_end_of_generation(s.token) {
            return Some((s.id, FinishReason::Eos));
        }
        self.scheduler.push_token(s.id, s.token);
        client.generated += 1;
        let piece = client.decoder.push(&self.tokenizer, s.token);
        let (text, stopped) = client.text.push(&piece);
        if client.events.send(Event::Token { id: s.token, text, logprobs: s.logprobs }).is_err() {
            return Some((s.id, FinishReason::Cancelled));
        }
        if stopped {
            Some((s.id, FinishReason::Stop))
        } else if client.generated >= client.max_tokens {
            Some((s.id, FinishReason::Length))
        } else {
            None
        }
    }

    /// Ends request `id`: frees its blocks and sends its last event.
    fn end(&mut self, id: SeqId, reason: FinishReason) {
        let Some((cached_tokens, preemptions)) = self.scheduler.finish(id) else { return };
        let Some(mut client) = self.clients.remove(&id) else { return };
        let text_tail = if reason == FinishReason::Stop {
            String::new()
        } else {
            let rest = client.decoder.flush();
            let (mut text, _) = client.text.push(&rest);
            text.push_str(&client.text.finish());
            text
        };
        let now = Instant::now();
        let usage = Usage { prompt_tokens: client.prompt_len, completion_tokens: client.generated, cached_tokens };
        let timings = RequestTimings {
            time_to_first_token: client.first_token.unwrap_or(now) - client.submitted,
            total: now - client.submitted,
            preemptions,
        };
        let _ = client.events.send(Event::Finished { reason, usage, timings, text_tail });
    }
}

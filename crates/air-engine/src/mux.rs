//! The model mux actor (one per node): the loaded models by name, and the route to each one's
//! scheduler.

use crate::actor::SchedulerMsg;
use crate::request::EngineError;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// Messages of the mux.
pub enum MuxMsg {
    /// The scheduler of the model named so (`None`: the first model).
    Route(Option<String>, RpcReplyPort<Result<ActorRef<SchedulerMsg>, EngineError>>),
}

pub(crate) struct ModelMux;

/// Schedulers by model name, in load order.
pub(crate) type Routes = Vec<(String, ActorRef<SchedulerMsg>)>;

impl Actor for ModelMux {
    type Msg = MuxMsg;
    type State = Routes;
    type Arguments = Routes;

    async fn pre_start(&self, _myself: ActorRef<MuxMsg>, routes: Routes) -> Result<Routes, ActorProcessingErr> {
        Ok(routes)
    }

    async fn handle(
        &self,
        _myself: ActorRef<MuxMsg>,
        msg: MuxMsg,
        routes: &mut Routes,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MuxMsg::Route(name, reply) => {
                let found = match &name {
                    None => routes.first(),
                    Some(n) => routes.iter().find(|(m, _)| m == n),
                };
                let _ = reply.send(
                    found.map(|(_, r)| r.clone()).ok_or_else(|| EngineError::UnknownModel(name.unwrap_or_default())),
                );
            }
        }
        Ok(())
    }

    /// Stops the schedulers and waits for them (and their compute threads) to end.
    async fn post_stop(&self, _myself: ActorRef<MuxMsg>, routes: &mut Routes) -> Result<(), ActorProcessingErr> {
        for (_, scheduler) in routes.iter() {
            scheduler.stop_and_wait(None, None).await.ok();
        }
        Ok(())
    }
}

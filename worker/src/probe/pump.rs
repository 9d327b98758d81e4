//! The pump between fd 3 and the agent: probes are answered here, everything else passes
//! through as it came. Frames are read and written with `shared::frame` on both sides; only a
//! channel-abuse probe writes bytes that are not a frame.

use std::time::Duration;

use shared::frame::{read_frame, write_frame};
use shared::probe::ProbeAnswer;
use shared::protocol::{FromWorker, ToWorker};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::WorkerError;
use crate::jail::Confinement;

/// What the pump writes towards the supervisor: a frame, or raw bytes (channel abuse tests).
enum Outgoing {
    Frame(FromWorker),
    Raw(Vec<u8>),
}

/// Runs the agent on one end of an internal socket pair and the pump on fd 3.
pub(crate) async fn serve_beside_agent(
    session_id: &str,
    confinement: Confinement,
    stream: UnixStream,
) -> Result<(), WorkerError> {
    let (agent_end, pump_end) = UnixStream::pair().map_err(WorkerError::Runtime)?;
    let sid = session_id.to_owned();
    let agent =
        tokio::spawn(async move { crate::agent::serve(&sid, confinement, agent_end).await });
    let (mut from_supervisor, mut to_supervisor) = stream.into_split();
    let (mut from_agent, mut to_agent) = pump_end.into_split();
    let (out, mut outgoing) = mpsc::channel::<Outgoing>(1024);

    tokio::spawn(async move {
        while let Some(item) = outgoing.recv().await {
            let written = match item {
                Outgoing::Frame(msg) => write_frame(&mut to_supervisor, &msg).await.is_ok(),
                Outgoing::Raw(bytes) => to_supervisor.write_all(&bytes).await.is_ok(),
            };
            if !written {
                break;
            }
        }
    });
    let agent_out = out.clone();
    tokio::spawn(async move {
        while let Ok(Some(msg)) = read_frame::<_, FromWorker>(&mut from_agent).await {
            if agent_out.send(Outgoing::Frame(msg)).await.is_err() {
                break;
            }
        }
    });

    while let Some(msg) = read_frame::<_, ToWorker>(&mut from_supervisor).await? {
        match msg {
            ToWorker::Probe(request) => {
                let reply = super::run(&request.probe);
                if let Some(bytes) = reply.raw {
                    let _ = out.send(Outgoing::Raw(bytes)).await;
                }
                let answer = ProbeAnswer {
                    id: request.id,
                    outcome: reply.answer.into_outcome(),
                };
                let _ = out
                    .send(Outgoing::Frame(FromWorker::ProbeAnswer(answer)))
                    .await;
            }
            other => {
                if write_frame(&mut to_agent, &other).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(to_agent);
    let _ = tokio::time::timeout(Duration::from_secs(2), agent).await;
    Ok(())
}

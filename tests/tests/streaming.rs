//! SSE streaming: exact event order and content, sequence numbers, message ids, deltas vs final
//! content, stored events, model errors, busy sessions; and the connection timeouts around
//! them: half-sent requests and idle connections are closed, streams are not.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{
    Frame, LONG, Server, ServerOpts, check_seq, concat_deltas, event_types, flood_text,
    is_ms_timestamp, is_uuid, of_type, types,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

/// Checks the exact shape of one normal streaming run of `query` answered with `expected`.
fn check_run(frames: &[Frame], sid: &str, query: &str, expected: &str) -> Result<()> {
    let tys = types(frames);
    ensure!(frames.len() >= 5, "too few frames: {tys:?}");
    let n = frames.len();
    ensure!(tys[0] == "user_message", "first frame: {tys:?}");
    ensure!(tys[1] == "agent_run_start", "second frame: {tys:?}");
    ensure!(
        tys[2..n - 2]
            .iter()
            .all(|t| t == "assistant_streaming_message"),
        "middle frames must all be deltas: {tys:?}"
    );
    ensure!(
        tys[n - 2] == "assistant_message",
        "penultimate frame: {tys:?}"
    );
    ensure!(tys[n - 1] == "agent_run_end", "last frame: {tys:?}");

    check_seq(frames)?;
    let mut event_ids = HashSet::new();
    for f in frames {
        let id = f.data["id"]
            .as_str()
            .with_context(|| format!("event id: {:?}", f.data))?;
        ensure!(is_uuid(id), "event id {id:?} is not a uuid");
        ensure!(event_ids.insert(id.to_string()), "duplicate event id {id}");
        ensure!(
            is_ms_timestamp(&f.data["timestamp"]),
            "timestamp: {:?}",
            f.data
        );
    }

    let user = &frames[0].data;
    ensure!(user["content"] == query, "user_message: {user}");

    let start = &frames[1].data;
    ensure!(start["sessionId"] == sid, "agent_run_start: {start}");
    ensure!(start["runOptions"]["input"] == query, "runOptions: {start}");
    ensure!(start["runOptions"]["stream"] == true, "runOptions: {start}");
    ensure!(
        start["runOptions"]["sessionId"] == sid,
        "runOptions: {start}"
    );
    ensure!(start["provider"] == "echo", "provider: {start}");
    ensure!(start["model"] == "echo", "model: {start}");

    let fin = &frames[n - 2].data;
    ensure!(fin["content"] == expected, "assistant_message: {fin}");
    ensure!(fin["finishReason"] == "stop", "assistant_message: {fin}");
    let mid = fin["messageId"]
        .as_str()
        .context("assistant_message.messageId")?;
    for d in of_type(frames, "assistant_streaming_message") {
        ensure!(
            d.data["messageId"] == mid,
            "delta messageId differs from the final message: {:?}",
            d.data
        );
        ensure!(d.data["content"].is_string(), "delta content: {:?}", d.data);
    }
    ensure!(
        concat_deltas(frames) == expected,
        "deltas concatenate to {:?}, expected {expected:?}",
        concat_deltas(frames)
    );

    let end = &frames[n - 1].data;
    ensure!(end["sessionId"] == sid, "agent_run_end: {end}");
    ensure!(end["iterations"] == 1, "agent_run_end: {end}");
    ensure!(end["status"] == "idle", "agent_run_end: {end}");
    ensure!(end["elapsedMs"].is_number(), "agent_run_end: {end}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_event_sequence_and_stored_events() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let mut s = server.stream(&sid, "hello").await?;
    ensure!(
        s.header("access-control-allow-origin").is_none(),
        "no wildcard CORS on SSE"
    );
    let frames = s.collect_until_end(LONG).await?;
    check_run(&frames, &sid, "hello", "echo: hello")?;

    // Stored events = the non-delta events of the stream, same objects, same order.
    let stored = server.events(&sid).await?;
    ensure!(
        event_types(&stored)
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "agent_run_end"
            ],
        "stored: {:?}",
        event_types(&stored)
    );
    let streamed: Vec<_> = frames
        .iter()
        .filter(|f| f.ty() != "assistant_streaming_message")
        .collect();
    ensure!(streamed.len() == stored.len(), "stored vs streamed count");
    for (f, e) in streamed.iter().zip(&stored) {
        ensure!(
            f.data["id"] == e["id"],
            "stored event id differs: {} vs {:?}",
            e,
            f.data
        );
        ensure!(f.data["type"] == e["type"], "stored event type differs");
    }
    ensure!(
        stored[2]["content"] == "echo: hello",
        "stored final: {}",
        stored[2]
    );

    let st = server.status(&sid).await?;
    ensure!(
        st["isProcessing"] == false && st["state"] == "idle",
        "status: {st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_increase_across_runs() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let first = server.stream_all(&sid, "one").await?;
    check_run(&first, &sid, "one", "echo: one")?;
    // A non-streaming run in between must not reset the counter either.
    server.query(&sid, "two").await?;
    let second = server.stream_all(&sid, "three").await?;
    check_run(&second, &sid, "three", "echo: three")?;

    let a = check_seq(&first)?;
    let b = check_seq(&second)?;
    let last_a = *a.last().context("first run ids")?;
    let first_b = *b.first().context("second run ids")?;
    ensure!(
        first_b > last_a,
        "seq must keep increasing across runs: first run ended at {last_a}, second began at {first_b}"
    );

    // Message ids differ between runs.
    let m1 = &of_type(&first, "assistant_message")[0].data["messageId"];
    let m2 = &of_type(&second, "assistant_message")[0].data["messageId"];
    ensure!(m1 != m2, "messageId reused across runs");

    // Memory includes the streamed and non-streamed turns.
    let recall = server.stream_all(&sid, "RECALL").await?;
    check_run(&recall, &sid, "RECALL", "recall: one | two | three")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_stream_is_complete() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let frames = server.stream_all(&sid, "FLOOD 1000").await?;
    check_run(&frames, &sid, "FLOOD 1000", &flood_text(1000))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_error_ends_run_with_error() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let frames = server.stream_all(&sid, "FAIL500").await?;
    let tys = types(&frames);
    ensure!(
        tys.first().map(String::as_str) == Some("user_message"),
        "{tys:?}"
    );
    ensure!(frames.len() >= 3, "too few frames: {tys:?}");
    let n = frames.len();
    let sys = &frames[n - 2].data;
    ensure!(
        sys["type"] == "system",
        "penultimate must be system: {tys:?}"
    );
    ensure!(sys["level"] == "error", "system level: {sys}");
    let msg = sys["message"].as_str().unwrap_or_default();
    ensure!(msg.starts_with("LLM API error"), "system message: {msg:?}");
    let end = &frames[n - 1].data;
    ensure!(
        end["type"] == "agent_run_end",
        "last must be agent_run_end: {tys:?}"
    );
    ensure!(end["status"] == "error", "agent_run_end: {end}");
    check_seq(&frames)?;

    let stored = server.events(&sid).await?;
    let stypes = event_types(&stored);
    ensure!(stypes.contains(&"system".to_string()), "stored: {stypes:?}");
    ensure!(
        stypes.last().map(String::as_str) == Some("agent_run_end"),
        "stored: {stypes:?}"
    );
    ensure!(
        stored.last().map(|e| &e["status"]) == Some(&json!("error")),
        "stored end"
    );

    let st = server.status(&sid).await?;
    ensure!(st["isProcessing"] == false, "status after error: {st}");

    // The session keeps working.
    let r = server.query(&sid, "after").await?;
    ensure!(r["content"] == "echo: after", "after error: {r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_session_rejects_second_query() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let mut s = server.stream(&sid, "SLOW 200").await?;
    s.read_until_type("agent_run_start", T).await?;

    let st = server.status(&sid).await?;
    ensure!(st["isProcessing"] == true, "status while running: {st}");
    ensure!(st["state"] == "executing", "status while running: {st}");

    server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": sid, "query": "x"}),
        )
        .await?
        .expect_error(409, "SESSION_BUSY", "non-streaming query while busy")?;
    let busy = server
        .post_sse(
            "/api/v1/sessions/query/stream",
            &json!({"sessionId": sid, "query": "x"}),
        )
        .await?;
    ensure!(
        busy.status == 409,
        "streaming query while busy: HTTP {}",
        busy.status
    );
    busy.json_body()
        .await?
        .expect_error(409, "SESSION_BUSY", "streaming query while busy")?;

    // The original stream is unaffected by the rejected requests.
    ensure!(server.abort(&sid).await?, "abort of the running query");
    let rest = s.collect_until_end(LONG).await?;
    ensure!(
        rest.last().map(Frame::ty) == Some("agent_run_end"),
        "stream end: {:?}",
        types(&rest)
    );
    ensure!(
        of_type(&rest, "user_message").is_empty(),
        "a rejected query leaked into the running stream: {:?}",
        types(&rest)
    );
    let r = server.query(&sid, "free again").await?;
    ensure!(r["content"] == "echo: free again", "after busy: {r}");
    Ok(())
}

/// A server whose connections must send a request head within 1 s and may idle for 2 s.
async fn short_timeouts() -> Result<Server> {
    let config = json!({"server": {"http": {
        "headerReadTimeoutSecs": 1,
        "idleTimeoutSecs": 2,
        "bodyReadTimeoutSecs": 1,
    }}});
    Server::start(ServerOpts::new().config_file("http.json", config.to_string())).await
}

/// Reads whatever the server sends until it closes the connection (EOF or reset); fails if it
/// is still open after `LONG`.
async fn read_until_closed(tcp: &mut TcpStream) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => bail!(
                "the server kept the connection open; it sent {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0) | Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slowloris: a request head sent a byte at a time never completes, and the server closes the
/// connection instead of waiting for it forever; so it does for a connection that sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_closed_after_the_header_timeout() -> Result<()> {
    let server = short_timeouts().await?;
    // Positive control: a whole request is answered.
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port())).await?;
    tcp.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let answer = read_until_closed(&mut tcp).await?;
    ensure!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    let mut tcp = TcpStream::connect(("127.0.0.1", server.port())).await?;
    tcp.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await?;
    // One more header byte every 100 ms, for up to 300 bytes: far past the 1 s allowed.
    let mut closed = false;
    for _ in 0..300 {
        if tcp.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => bail!(
                "the server answered a half-sent request: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        }
    }
    ensure!(closed, "a trickled request head kept its connection open");

    let mut silent = TcpStream::connect(("127.0.0.1", server.port())).await?;
    let sent = read_until_closed(&mut silent).await?;
    ensure!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    Ok(())
}

/// Slowloris on the body: a request whose head arrived is in progress, which the connection's
/// watchdog leaves alone (it may be a stream), so a body trickled a byte at a time must fail on
/// its own deadline, with a 408 and nothing created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_fails_after_the_body_timeout() -> Result<()> {
    let server = short_timeouts().await?;
    let head = "POST /api/v1/sessions/create HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
                Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port())).await?;
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(b"{").await?;
    // One more byte every 100 ms, for up to 300 bytes: far past the 1 s allowed.
    let mut answer = Vec::new();
    for _ in 0..300 {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                answer.extend(read_until_closed(&mut tcp).await?);
                break;
            }
        }
        if tcp.write_all(b" ").await.is_err() {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    ensure!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    ensure!(answer.contains(r#""code":"REQUEST_TIMEOUT""#), "{answer:?}");
    let listed = server.get("/api/v1/sessions").await?;
    ensure!(listed.json["sessions"] == json!([]), "{}", listed.json);
    // A body sent whole is read as usual.
    server.create_session().await?;
    Ok(())
}

/// A keep-alive connection left idle after its response is closed; so is an HTTP/2 connection
/// (cleartext, prior knowledge) that opens and then sends no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() -> Result<()> {
    let server = short_timeouts().await?;
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port())).await?;
    tcp.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let sent = read_until_closed(&mut tcp).await?;
    let text = String::from_utf8_lossy(&sent);
    ensure!(
        text.starts_with("HTTP/1.1 200")
            && !text.to_ascii_lowercase().contains("connection: close"),
        "a keep-alive response first: {text:?}"
    );

    let mut h2 = TcpStream::connect(("127.0.0.1", server.port())).await?;
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
    let sent = read_until_closed(&mut h2).await?;
    // The server's SETTINGS (type 4) comes first: it did speak HTTP/2 before closing.
    ensure!(
        sent.len() >= 9 && sent[3] == 4,
        "HTTP/2 frames from the server: {sent:?}"
    );
    Ok(())
}

/// Streams are requests in progress, and no timeout touches them however quiet they are: a
/// follow stream waits through several idle timeouts and still gets the next run, and a
/// streaming query that outlasts them ends normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_outlive_the_connection_timeouts() -> Result<()> {
    let server = short_timeouts().await?;
    let sid = server.create_session().await?;
    let mut follow = server
        .get_sse(
            &format!("/api/v1/sessions/events/stream?sessionId={sid}"),
            &[],
        )
        .await?;
    follow.expect_event_stream()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = server.query(&sid, "after a quiet while").await?;
    ensure!(r["content"] == "echo: after a quiet while", "{r}");
    let frames = follow.read_until_type("agent_run_end", T).await?;
    ensure!(
        frames
            .iter()
            .any(|f| f.ty() == "assistant_message"
                && f.data["content"] == "echo: after a quiet while"),
        "the follow stream missed the run: {:?}",
        types(&frames)
    );

    // SLOW 80: one token every 50 ms, about 4 s in all.
    let frames = server.stream_all(&sid, "SLOW 80").await?;
    ensure!(
        frames
            .last()
            .is_some_and(|f| f.ty() == "agent_run_end" && f.data["status"] == "idle"),
        "{:?}",
        types(&frames)
    );
    Ok(())
}

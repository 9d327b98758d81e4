//! The client side of the control socket, for `supervisor ctl`: one request, one answer, and a
//! short human rendering of it.

use std::path::Path;

use interprocess::local_socket::GenericFilePath;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::tokio::prelude::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{CtlError, Request, io};

/// Sends one request and returns the answer (on a runtime of its own: the CLI has none).
///
/// # Errors
/// No server on the socket, or an unreadable answer.
pub fn call(path: &Path, request: &Request) -> Result<Value, CtlError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io(path))?;
    runtime.block_on(exchange(path, request))
}

async fn exchange(path: &Path, request: &Request) -> Result<Value, CtlError> {
    let name = path.to_fs_name::<GenericFilePath>().map_err(io(path))?;
    let stream = Stream::connect(name).await.map_err(io(path))?;
    let mut line = serde_json::to_string(request).map_err(|e| CtlError::Answer(e.to_string()))?;
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .await
        .map_err(io(path))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .await
        .map_err(io(path))?;
    serde_json::from_str(&answer).map_err(|e| CtlError::Answer(e.to_string()))
}

/// An answer as a person reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Rendered {
    /// A table of workers or sessions, or `ok ...`: for stdout.
    Done(String),
    /// What the server refused and why: for stderr.
    Refused(String),
}

/// A short human rendering of an answer.
pub fn render(answer: &Value) -> Rendered {
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let table = |rows: &[Value], columns: &[&str]| {
        let mut out = columns.join("\t") + "\n";
        for row in rows {
            let cells: Vec<String> = columns.iter().map(|c| cell(&row[*c])).collect();
            out += &cells.join("\t");
            out.push('\n');
        }
        out
    };
    if let Some(workers) = answer["workers"].as_array() {
        let columns = [
            "sessionId",
            "pid",
            "state",
            "uptimeSecs",
            "rssKib",
            "cpuSecs",
            "events",
        ];
        Rendered::Done(table(workers, &columns))
    } else if let Some(secret) = answer["secret"].as_str() {
        // The secret alone on the last line, for scripts (`| tail -n1`).
        let token = &answer["token"];
        Rendered::Done(format!(
            "created token {} for tenant {} (user {}, role {}, expires {})\n\
             this secret is shown once; keep it:\n{secret}\n",
            cell(&token["id"]),
            cell(&token["tenant"]),
            cell(&token["user"]),
            cell(&token["role"]),
            cell(&token["expiresAt"]),
        ))
    } else if let Some(tokens) = answer["tokens"].as_array() {
        let columns = [
            "id",
            "name",
            "tenant",
            "user",
            "role",
            "createdAt",
            "expiresAt",
            "revokedAt",
        ];
        Rendered::Done(table(tokens, &columns))
    } else if let Some(sessions) = answer["sessions"].as_array() {
        let columns = [
            "sessionId",
            "name",
            "updatedAt",
            "loaded",
            "worker",
            "running",
        ];
        Rendered::Done(table(sessions, &columns))
    } else if let Some(entries) = answer["entries"].as_array() {
        let columns = ["id", "at", "tenant", "user", "action", "target", "outcome"];
        let mut text = table(entries, &columns);
        if let Some(next) = answer["nextBefore"].as_u64() {
            text += &format!("more: --before {next}\n");
        }
        Rendered::Done(text)
    } else if answer["success"] == false {
        Rendered::Refused(format!(
            "error: {} ({})\n",
            cell(&answer["message"]),
            cell(&answer["code"])
        ))
    } else {
        Rendered::Done(format!("ok {answer}\n"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Rendered, render};

    #[test]
    fn answers_render_as_tables_or_one_line() {
        let workers =
            json!({"success": true, "workers": [{"sessionId": "a", "pid": 7, "state": null}]});
        let Rendered::Done(text) = render(&workers) else {
            panic!("a table expected")
        };
        assert!(text.starts_with("sessionId\tpid\tstate\t"), "{text}");
        assert!(text.contains("\na\t7\t-\t"), "{text}");
        let refused = json!({"success": false, "code": "SESSION_NOT_FOUND", "message": "gone"});
        assert_eq!(
            render(&refused),
            Rendered::Refused("error: gone (SESSION_NOT_FOUND)\n".into())
        );
        assert_eq!(
            render(&json!({"success": true})),
            Rendered::Done("ok {\"success\":true}\n".into())
        );
    }
}

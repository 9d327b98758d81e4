//! The built-in offline `echo` model (agent.md §4.12): used when no model is configured, so the
//! server works out of the box, and scriptable with the same directives as the test fake LLM.
//!
//! Directives (the trimmed text of the last message): `FAIL500`, `TOOL <name> <json>`,
//! `SLOW <n>`, `FLOOD <n>`, `THINK <text>`, and our `RECALL`, which answers with the earlier user
//! messages of the conversation, so that memory across turns and worker restarts can be seen
//! without a real model. Anything else is echoed back.

use shared::directives::{numbered, words};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;
use shared::protocol::{Delta, ModelErrorKind, ModelFailure, ModelReply, ModelRequest, Usage};
use tokio_util::sync::CancellationToken;

use super::{Finished, Outcome, RawParams, Replies};

const SLOW_TOKEN_DELAY: Duration = Duration::from_millis(50);
const TOOL_ARGUMENT_FRAGMENT: usize = 7;

/// Tool-call ids unique across the process, so a worker never sees two calls with one id.
static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

/// What the echo model will answer.
#[derive(Debug, PartialEq)]
enum Plan {
    Fail500,
    Text {
        reasoning: Vec<String>,
        tokens: Vec<String>,
        delay: Duration,
    },
    ToolCall {
        name: String,
        arguments: String,
    },
}

pub(super) async fn respond(
    request: &ModelRequest,
    params: &RawParams<'_>,
    replies: &Replies,
    cancel: &CancellationToken,
) -> Outcome {
    let started = Instant::now();
    // Each message stays raw text until it is looked at: only the last one, usually.
    let Some(messages) = params
        .get("messages")
        .and_then(|m| serde_json::from_str::<Vec<&RawValue>>(m.get()).ok())
    else {
        return failure(
            ModelErrorKind::BadRequest,
            Some(400),
            "messages must be an array",
        );
    };
    let tools: Vec<String> = params
        .get("tools")
        .and_then(|t| serde_json::from_str::<Vec<ToolDefinition>>(t.get()).ok())
        .map(|tools| {
            tools
                .into_iter()
                .filter_map(|t| t.function.and_then(|f| f.name))
                .collect()
        })
        .unwrap_or_default();
    let parse = |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).unwrap_or_default();
    let last = messages.last().map(|m| parse(m));
    let earlier_users = || {
        let mut users: Vec<Value> = messages
            .iter()
            .map(|m| parse(m))
            .filter(|m| m["role"] == "user")
            .collect();
        users.pop();
        users
    };
    let (deltas, delay, finish_reason) = match plan(last.as_ref(), earlier_users, &tools) {
        // Echo is not HTTP: nothing to retry.
        Plan::Fail500 => {
            return failure(ModelErrorKind::Server, Some(500), "scripted failure");
        }
        Plan::Text {
            reasoning,
            tokens,
            delay,
        } => {
            let deltas = reasoning
                .into_iter()
                .map(Delta::Reasoning)
                .chain(tokens.into_iter().map(Delta::Text));
            (deltas.collect::<Vec<_>>(), delay, "stop")
        }
        Plan::ToolCall { name, arguments } => {
            let id = format!("call_{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed));
            let mut deltas = vec![Delta::ToolCall {
                index: 0,
                id: Some(id),
                name: Some(name),
                arguments: String::new(),
            }];
            deltas.extend(
                fragments(&arguments, TOOL_ARGUMENT_FRAGMENT)
                    .into_iter()
                    .map(|arguments| Delta::ToolCall {
                        index: 0,
                        id: None,
                        name: None,
                        arguments,
                    }),
            );
            (deltas, Duration::ZERO, "tool_calls")
        }
    };
    let cancelled = || failure(ModelErrorKind::Cancelled, None, "cancelled");
    if !replies
        .send(ModelReply::Started {
            id: replies.id(),
            attempt: 1,
        })
        .await
    {
        return cancelled();
    }
    let completion_tokens = deltas.len() as u64;
    let mut ttft = None;
    for (index, delta) in deltas.into_iter().enumerate() {
        if index > 0 && !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => {}
            }
        }
        if cancel.is_cancelled() {
            return cancelled();
        }
        ttft.get_or_insert_with(|| started.elapsed());
        if !replies
            .send(ModelReply::Delta {
                id: replies.id(),
                delta,
            })
            .await
        {
            return cancelled();
        }
    }
    let prompt_tokens = request.params.len() as u64 / 4;
    Outcome::Done(Finished {
        finish_reason: finish_reason.into(),
        usage: Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            estimated: true,
        }),
        ttft,
        total: started.elapsed(),
    })
}

fn failure(kind: ModelErrorKind, status: Option<u16>, message: &str) -> Outcome {
    Outcome::Failed(ModelFailure {
        kind,
        status,
        message: message.to_owned(),
        attempts: 1,
        partial: false,
    })
}

/// The text of a message: a string as is, or the `text` of its parts joined with a space.
fn text_of(message: &Value) -> String {
    match &message["content"] {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn fragments(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// A tool definition, as far as the echo model reads it: only its name.
#[derive(serde::Deserialize)]
struct ToolDefinition {
    function: Option<ToolFunction>,
}

#[derive(serde::Deserialize)]
struct ToolFunction {
    name: Option<String>,
}

/// The answer to the conversation whose last message is `last`; `earlier_users` gives the user
/// messages before it, parsed only when a directive asks for them.
fn plan(
    last: Option<&Value>,
    earlier_users: impl FnOnce() -> Vec<Value>,
    tools: &[String],
) -> Plan {
    let instant = |tokens| Plan::Text {
        reasoning: Vec::new(),
        tokens,
        delay: Duration::ZERO,
    };
    let Some(last) = last else {
        return instant(words("echo: "));
    };
    if last["role"] == "tool" {
        return instant(words(&format!("tool said: {}", text_of(last))));
    }
    let query = text_of(last);
    let query = query.trim();
    let (directive, rest) = query.split_once(char::is_whitespace).unwrap_or((query, ""));
    let rest = rest.trim();
    let count = |default: usize| {
        rest.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    match directive {
        "FAIL500" => Plan::Fail500,
        "SLOW" => Plan::Text {
            reasoning: Vec::new(),
            tokens: numbered("t", count(100)),
            delay: SLOW_TOKEN_DELAY,
        },
        "FLOOD" => instant(numbered("w", count(1000))),
        "THINK" => Plan::Text {
            reasoning: words(rest),
            tokens: words(&format!("echo: {rest}")),
            delay: Duration::ZERO,
        },
        "TOOL" if !rest.is_empty() => {
            let (name, arguments) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let name = tools
                .iter()
                .find(|t| t.contains(name))
                .cloned()
                .unwrap_or_else(|| name.to_owned());
            let arguments = if arguments.trim().is_empty() {
                "{}".to_owned()
            } else {
                arguments.trim().to_owned()
            };
            Plan::ToolCall { name, arguments }
        }
        "RECALL" if rest.is_empty() => {
            let earlier: Vec<String> = earlier_users().iter().map(text_of).collect();
            let answer = if earlier.is_empty() {
                "(nothing)".to_owned()
            } else {
                earlier.join(" | ")
            };
            instant(words(&format!("recall: {answer}")))
        }
        _ => instant(words(&format!("echo: {query}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The plan for a whole conversation, as `respond` makes it from the raw messages.
    fn plan_of(messages: &[Value], tools: &[String]) -> Plan {
        let earlier_users = || {
            let mut users: Vec<Value> = messages
                .iter()
                .filter(|m| m["role"] == "user")
                .cloned()
                .collect();
            users.pop();
            users
        };
        plan(messages.last(), earlier_users, tools)
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    fn text_plan(tokens: &[&str]) -> Plan {
        Plan::Text {
            reasoning: Vec::new(),
            tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
            delay: Duration::ZERO,
        }
    }

    #[test]
    fn echoes_word_by_word() {
        assert_eq!(
            plan_of(&[user("  hello  world ")], &[]),
            text_plan(&["echo:", " hello", " ", " world"])
        );
        assert_eq!(plan_of(&[user("hi")], &[]), text_plan(&["echo:", " hi"]));
    }

    #[test]
    fn directives() {
        assert_eq!(plan_of(&[user("FAIL500")], &[]), Plan::Fail500);
        assert_eq!(
            plan_of(&[user("FLOOD 3")], &[]),
            text_plan(&["w0", " w1", " w2"])
        );
        match plan_of(&[user("SLOW 2")], &[]) {
            Plan::Text { tokens, delay, .. } => {
                assert_eq!(tokens, ["t0", " t1"]);
                assert_eq!(delay, SLOW_TOKEN_DELAY);
            }
            other => panic!("{other:?}"),
        }
        let tool = plan_of(
            &[user("TOOL read {\"path\":\"a.txt\"}")],
            &["list_directory".into(), "read_file".into()],
        );
        assert_eq!(
            tool,
            Plan::ToolCall {
                name: "read_file".into(),
                arguments: "{\"path\":\"a.txt\"}".into()
            }
        );
        let tool = plan_of(&[user("TOOL nothing")], &[]);
        assert_eq!(
            tool,
            Plan::ToolCall {
                name: "nothing".into(),
                arguments: "{}".into()
            }
        );
        match plan_of(&[user("THINK a b")], &[]) {
            Plan::Text {
                reasoning, tokens, ..
            } => {
                assert_eq!(reasoning, ["a", " b"]);
                assert_eq!(tokens.concat(), "echo: a b");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tool_message_is_answered() {
        let messages = [
            user("TOOL x"),
            json!({"role": "tool", "tool_call_id": "c", "content": "Error: nope"}),
        ];
        assert_eq!(
            plan_of(&messages, &[]),
            text_plan(&["tool", " said:", " Error:", " nope"])
        );
    }

    #[test]
    fn recall_lists_earlier_user_messages() {
        let messages = [
            json!({"role": "system", "content": "s"}),
            user("alpha"),
            user("beta"),
            user("RECALL"),
        ];
        match plan_of(&messages, &[]) {
            Plan::Text { tokens, .. } => assert_eq!(tokens.concat(), "recall: alpha | beta"),
            other => panic!("{other:?}"),
        }
        match plan_of(&[user("RECALL")], &[]) {
            Plan::Text { tokens, .. } => assert_eq!(tokens.concat(), "recall: (nothing)"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fragments_respect_characters() {
        assert_eq!(fragments("ééééééééé", 7), ["ééééééé", "éé"]);
    }
}

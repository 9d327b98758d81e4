//! Named JSON scripts: a step per model call of a run, chosen by the `x-fake-script` header or a
//! `[[fake:<name>]]` marker in the query.

use axum::http::HeaderMap;
use serde_json::Value;

use super::conversation::Conversation;
use super::plan::{DEFAULT_FRAGMENT, Ending, HttpFailure, Plan, PlannedCall, echo};
use super::state::Shared;

/// The script named by the header or a marker in the current query, if any.
pub(super) fn selected_script(
    shared: &Shared,
    headers: &HeaderMap,
    conversation: &Conversation,
) -> Option<(String, Value)> {
    let inner = shared.lock();
    let by_header = headers
        .get("x-fake-script")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let by_marker = || {
        let query = conversation.query_text();
        let start = query.find("[[fake:")? + "[[fake:".len();
        let end = query[start..].find("]]")? + start;
        Some(query[start..end].to_owned())
    };
    let name = by_header.or_else(by_marker)?;
    inner.scripts.get(&name).cloned().map(|s| (name, s))
}

pub(super) fn template(text: &str, conversation: &Conversation) -> String {
    text.replace("{{lastUser}}", &conversation.query_text())
        .replace("{{lastToolResult}}", &conversation.last_tool_result())
        .replace("{{toolNames}}", &conversation.tools.join(", "))
}

/// Step `conversation.step()` of a script: its text, reasoning, tool calls, delays, and the
/// hang, cut, mid-stream error or HTTP failure it asks for.
pub(super) fn script_plan(
    shared: &Shared,
    name: &str,
    script: &Value,
    conversation: &Conversation,
) -> Plan {
    let step_index = conversation.step();
    let Some(step) = script
        .get("steps")
        .and_then(Value::as_array)
        .and_then(|steps| steps.get(step_index))
    else {
        // More steps than scripted: an answer that ends the run.
        return echo(&conversation.query_text());
    };
    let strings = |key: &str| -> Vec<String> {
        step.get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|t| template(t, conversation))
                    .collect()
            })
            .unwrap_or_default()
    };
    let number = |key: &str| step.get(key).and_then(Value::as_u64).unwrap_or(0);
    let after = |key: &str| {
        step.get(key)
            .and_then(|v| v.get("afterTokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize
    };
    let mut plan = Plan::text(strings("text"));
    plan.reasoning = strings("reasoning");
    plan.delay_ms = number("delayMs");
    plan.first_token_delay_ms = number("firstTokenDelayMs");
    plan.token_delay_ms = number("tokenDelayMs");
    plan.finish = step
        .get("finishReason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    plan.usage = step.get("usage").cloned();
    plan.omit_done = step.get("omitDone").and_then(Value::as_bool) == Some(true);
    let bad_arguments = step.get("badArguments").and_then(Value::as_bool) == Some(true);
    plan.calls = step
        .get("toolCalls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|call| PlannedCall {
            id: call.get("id").and_then(Value::as_str).map(str::to_owned),
            name: call
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("tool")
                .to_owned(),
            arguments: if bad_arguments {
                "{\"path\": ".to_owned()
            } else {
                match call.get("arguments") {
                    Some(Value::String(text)) => template(text, conversation),
                    Some(other) => other.to_string(),
                    None => "{}".to_owned(),
                }
            },
            fragment: call
                .get("fragment")
                .and_then(Value::as_u64)
                .map_or(DEFAULT_FRAGMENT, |f| f.max(1) as usize),
        })
        .collect();
    match step.get("hang").and_then(Value::as_str) {
        Some("before_headers") => plan.hang_before_headers = true,
        Some("after_headers") => plan.ending = Ending::HangAfter(0),
        Some("mid_stream") => {
            let after_tokens = step.get("afterTokens").and_then(Value::as_u64).unwrap_or(1);
            plan.ending = Ending::HangAfter(after_tokens as usize);
        }
        _ => {}
    }
    if step.get("cut").is_some() {
        plan.ending = Ending::CutAfter(after("cut"));
    }
    if let Some(error) = step.get("sseError") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("mid-stream failure")
            .to_owned();
        plan.ending = Ending::ErrorAfter(after("sseError"), message);
    }
    if let Some(http) = step.get("http") {
        let times = step.get("failTimes").and_then(Value::as_u64);
        let fail = match times {
            None => true,
            Some(times) => shared.should_fail(
                conversation.counter_key(&format!("script:{name}")),
                u32::try_from(times).unwrap_or(u32::MAX),
            ),
        };
        if fail {
            let status = http
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(500);
            plan.failure = Some(HttpFailure {
                status,
                headers: http
                    .get("headers")
                    .and_then(Value::as_object)
                    .map(|h| {
                        h.iter()
                            .map(|(k, v)| {
                                (
                                    k.clone(),
                                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                body: http.get("body").cloned(),
                message: format!("scripted failure {status}"),
            });
        }
    }
    plan
}

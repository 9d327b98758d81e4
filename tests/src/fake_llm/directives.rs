//! The directive grammar: the last message's first word (`SLOW 40`, `FAIL 429`, `TOOL read
//! {...}`, ...) says what to answer; anything else is echoed.

use shared::directives::{numbered, words};

use super::conversation::{Conversation, Role};
use super::plan::{DEFAULT_FRAGMENT, Ending, Plan, PlannedCall, echo};
use super::state::Shared;

/// The token delay of `SLOW n` without a second number.
const DEFAULT_SLOW_MS: u64 = 50;

/// The directive grammar applied to the last message (a tool result is echoed as `tool said:`).
pub(super) fn directive_plan(shared: &Shared, conversation: &Conversation, auth_key: &str) -> Plan {
    let Some(last) = conversation.messages.last() else {
        return echo("");
    };
    if last.role == Role::Tool {
        return Plan::text(words(&format!("tool said: {}", last.text)));
    }
    let mut query = last.text.trim().to_owned();
    let mut usage_override = None;
    for (prefix, value) in [("USAGE ", true), ("NOUSAGE ", false)] {
        if let Some(rest) = query.strip_prefix(prefix) {
            usage_override = Some(value);
            query = rest.trim().to_owned();
        }
    }
    let (directive, rest) = query
        .split_once(char::is_whitespace)
        .unwrap_or((&query, ""));
    let rest = rest.trim();
    let numbers: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let number = |i: usize, default: u64| numbers.get(i).copied().unwrap_or(default);
    let mut plan = match directive {
        "FAIL500" => Plan::fail(500, "scripted failure"),
        "FAIL" => {
            let status = u16::try_from(number(0, 500)).unwrap_or(500);
            let message = if status == 401 {
                // Like OpenAI, echo the key back: the supervisor must scrub it.
                format!("Incorrect API key provided: {auth_key}")
            } else {
                format!("scripted failure {status}")
            };
            let mut plan = Plan::fail(status, &message);
            if let (Some(secs), Some(failure)) = (numbers.get(1), plan.failure.as_mut()) {
                failure
                    .headers
                    .push(("retry-after".into(), secs.to_string()));
            }
            plan
        }
        "FLAKY" => {
            let status = u16::try_from(number(0, 500)).unwrap_or(500);
            let times = u32::try_from(number(1, 1)).unwrap_or(1);
            if shared.should_fail(conversation.counter_key(&query), times) {
                Plan::fail(status, &format!("flaky failure {status}"))
            } else {
                echo(&query)
            }
        }
        "SLOW" => Plan {
            token_delay_ms: number(1, DEFAULT_SLOW_MS),
            first_token_delay_ms: 0,
            ..Plan::text(numbered("t", number(0, 100) as usize))
        },
        "FLOOD" => Plan::text(numbered("w", number(0, 1000) as usize)),
        "HANG" => Plan {
            ending: Ending::HangAfter(0),
            ..Plan::text(Vec::new())
        },
        "HANG_HEADERS" => Plan {
            hang_before_headers: true,
            ..Plan::text(Vec::new())
        },
        "STALL" => Plan {
            ending: Ending::HangAfter(number(0, 1) as usize),
            ..Plan::text(numbered("t", number(0, 1) as usize + 1000))
        },
        "CUT" => Plan {
            ending: Ending::CutAfter(number(0, 1) as usize),
            ..Plan::text(numbered("t", number(0, 1) as usize + 1000))
        },
        "SSEERR" => Plan {
            ending: Ending::ErrorAfter(number(0, 1) as usize, "mid-stream failure".into()),
            ..Plan::text(numbered("t", number(0, 1) as usize + 1000))
        },
        "THINK" => Plan {
            reasoning: words(rest),
            ..echo(rest)
        },
        "BADJSON" => Plan {
            calls: vec![PlannedCall {
                id: None,
                name: conversation.tool_named("read"),
                arguments: "{\"path\": ".into(),
                fragment: DEFAULT_FRAGMENT,
            }],
            ..Plan::text(Vec::new())
        },
        "TOOL" if !rest.is_empty() => Plan {
            calls: vec![parse_call(conversation, rest)],
            ..Plan::text(Vec::new())
        },
        "TOOLS" if !rest.is_empty() => Plan {
            calls: rest
                .split(";;")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| parse_call(conversation, c))
                .collect(),
            ..Plan::text(Vec::new())
        },
        _ => echo(&query),
    };
    plan.usage_override = usage_override;
    plan
}

/// `<name> <json>` of `TOOL`/`TOOLS`.
pub(super) fn parse_call(conversation: &Conversation, spec: &str) -> PlannedCall {
    let (name, arguments) = spec.split_once(char::is_whitespace).unwrap_or((spec, ""));
    let arguments = arguments.trim();
    PlannedCall {
        id: None,
        name: conversation.tool_named(name),
        arguments: if arguments.is_empty() {
            "{}".into()
        } else {
            arguments.to_owned()
        },
        fragment: DEFAULT_FRAGMENT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_llm::conversation::conversation;
    use crate::fake_llm::conversation::tests::openai;
    use crate::fake_llm::wire::Wire;
    use serde_json::json;

    #[test]
    fn directives() {
        let shared = Shared::default();
        let plan = |text: &str| {
            directive_plan(
                &shared,
                &openai(json!([{"role": "user", "content": text}])),
                "k",
            )
        };
        assert_eq!(plan("hello there").text.concat(), "echo: hello there");
        assert_eq!(
            plan("FAIL 429 2").failure.unwrap().headers,
            [("retry-after".to_owned(), "2".to_owned())]
        );
        assert!(plan("FAIL 401").failure.unwrap().message.contains('k'));
        let tools = plan("TOOLS read {\"a\":1} ;; other");
        assert_eq!(tools.calls.len(), 2);
        assert_eq!(tools.calls[1].arguments, "{}");
        assert_eq!(tools.finish_reason(), "tool_calls");
        assert!(plan("FLAKY 503 1").failure.is_some());
        assert!(plan("FLAKY 503 1").failure.is_none());
        assert_eq!(plan("SLOW 3 5").token_delay_ms, 5);
        assert_eq!(plan("STALL 2").ending, Ending::HangAfter(2));
        assert_eq!(plan("THINK a b").reasoning, ["a", " b"]);
        assert!(plan("NOUSAGE hi").usage_override == Some(false));
        let tool_turn =
            openai(json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]));
        assert_eq!(
            directive_plan(&shared, &tool_turn, "").text.concat(),
            "tool said: 42"
        );
    }

    #[test]
    fn anthropic_tool_turns() {
        let c = conversation(
            Wire::Anthropic,
            &json!({"messages": [
                {"role": "user", "content": [{"type": "text", "text": "go"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "done"}]},
            ]}),
        );
        assert_eq!(c.step(), 1);
        assert_eq!(c.query_text(), "go");
        let plan = directive_plan(&Shared::default(), &c, "");
        assert_eq!(plan.text.concat(), "tool said: done");
    }
}

//! The models this server may call: the provider table of agent.md §4.7, and the resolution of
//! every configured model (`model`, the seed's `model.providers[]`, upstream's `server.models[]`)
//! to an adapter, a base URL, a key and its settings.
//!
//! It is built once, when the configuration is loaded, because that is the only moment the
//! supervisor reads the environment's keys. The gateway's allow-list, `/api/v1/models` and the
//! worker's model choice all read this one list. A worker only ever sees [`ModelRef`]s.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use shared::protocol::ModelRef;

use super::{
    Config, ConfigError, GatewayConfig, ModelConfig, ProviderConfig, ReasoningPassback, Secret,
    TimeoutsConfig,
};

const DEFAULT_PROVIDER: &str = "openai";
const DEFAULT_MODEL_ID: &str = "gpt-4o";
const DEFAULT_AZURE_API_VERSION: &str = "2024-10-01-preview";
const ECHO_DISPLAY_NAME: &str = "Echo (offline test model, no LLM configured)";

/// How a provider is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    /// The built-in offline model (agent.md §4.12).
    Echo,
    /// OpenAI chat completions; `azure` routes by deployment and sends `api-key`.
    OpenAi { azure: bool },
    /// Anthropic Messages.
    Anthropic,
}

/// One row of the provider table.
#[derive(Clone, Copy)]
struct ProviderSpec {
    adapter: Adapter,
    default_base: Option<&'static str>,
    /// Environment variable that overrides `default_base` (below explicit config).
    base_env: Option<&'static str>,
    key_env: Option<&'static str>,
    /// A fixed key for servers that ignore it.
    placeholder: Option<&'static str>,
    key_required: bool,
    streaming: bool,
    tools: bool,
    stream_usage: bool,
    passback: ReasoningPassback,
}

fn spec(provider: &str) -> ProviderSpec {
    let openai = ProviderSpec {
        adapter: Adapter::OpenAi { azure: false },
        default_base: None,
        base_env: None,
        key_env: None,
        placeholder: None,
        key_required: true,
        streaming: true,
        tools: true,
        stream_usage: true,
        passback: ReasoningPassback::ToolCalls,
    };
    let hosted = |base: &'static str, key: &'static str| ProviderSpec {
        default_base: Some(base),
        key_env: Some(key),
        ..openai
    };
    match provider {
        "echo" => ProviderSpec {
            adapter: Adapter::Echo,
            key_required: false,
            ..openai
        },
        "openai" | "openai-non-streaming" => ProviderSpec {
            default_base: Some("https://api.openai.com/v1"),
            base_env: Some("OPENAI_BASE_URL"),
            key_env: Some("OPENAI_API_KEY"),
            streaming: provider == "openai",
            passback: ReasoningPassback::None,
            ..openai
        },
        "azure-openai" => ProviderSpec {
            adapter: Adapter::OpenAi { azure: true },
            key_env: Some("AZURE_OPENAI_API_KEY"),
            passback: ReasoningPassback::None,
            ..openai
        },
        "anthropic" => ProviderSpec {
            adapter: Adapter::Anthropic,
            default_base: Some("https://api.anthropic.com"),
            base_env: Some("ANTHROPIC_BASE_URL"),
            key_env: Some("ANTHROPIC_API_KEY"),
            ..openai
        },
        // Upstream falls back to OPENAI_API_KEY for these two; we never send the OpenAI key to
        // another host.
        "deepseek" => hosted("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
        "volcengine" => hosted("https://ark.cn-beijing.volces.com/api/v3", "ARK_API_KEY"),
        "openrouter" => hosted("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
        "groq" => hosted("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
        "mistral" => hosted("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
        "gemini" => hosted(
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "GEMINI_API_KEY",
        ),
        "perplexity" => ProviderSpec {
            tools: false,
            stream_usage: false,
            ..hosted("https://api.perplexity.ai", "PERPLEXITY_API_KEY")
        },
        "ollama" => ProviderSpec {
            default_base: Some("http://127.0.0.1:11434/v1"),
            placeholder: Some("ollama"),
            key_required: false,
            ..openai
        },
        "lm-studio" => ProviderSpec {
            default_base: Some("http://127.0.0.1:1234/v1"),
            placeholder: Some("lm-studio"),
            key_required: false,
            ..openai
        },
        "openai-compatible" => ProviderSpec {
            base_env: Some("OPENAI_BASE_URL"),
            key_env: Some("OPENAI_COMPATIBLE_API_KEY"),
            key_required: false,
            ..openai
        },
        // Any other name (e.g. `kimi`): OpenAI-compatible, baseURL required, key only if given.
        _ => ProviderSpec {
            key_required: false,
            ..openai
        },
    }
}

/// Per-attempt timeouts, all resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub headers: Duration,
    pub idle: Duration,
    pub total: Duration,
}

impl Timeouts {
    fn resolve(global: &TimeoutsConfig, model: Option<&TimeoutsConfig>) -> Self {
        let pick = |f: fn(&TimeoutsConfig) -> Option<u64>, default_ms: u64| {
            Duration::from_millis(model.and_then(f).or(f(global)).unwrap_or(default_ms))
        };
        Self {
            connect: pick(|t| t.connect_ms, 10_000),
            headers: pick(|t| t.headers_ms, 300_000),
            idle: pick(|t| t.idle_ms, 300_000),
            total: pick(|t| t.total_ms, 20 * 60_000),
        }
    }
}

/// Everything about one model that shapes its requests.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub max_tokens: Option<u32>,
    pub context_window: Option<u64>,
    pub stream_usage: bool,
    pub passback: ReasoningPassback,
    pub send_thinking: Option<bool>,
    /// Tarko `thinking` from the supervisor's config, used when a request carries none.
    pub thinking: Option<Value>,
    /// False for providers that cannot stream: the gateway then makes a normal call.
    pub streaming: bool,
    /// False for providers without tool calling: `tools` is left out of requests.
    pub tools: bool,
    pub api_version: String,
    pub max_attempts: u32,
    pub retry_base_delay: Duration,
    pub timeouts: Timeouts,
    pub params: Map<String, Value>,
}

/// One callable model.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub provider: String,
    pub id: String,
    pub display_name: Option<String>,
    pub adapter: Adapter,
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
    /// Extra headers; their values are marked sensitive so no debug output shows them.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Why this model cannot be called (no key, no base URL). Every call then fails with a
    /// `config` error naming the fix: a configured model never silently becomes echo.
    pub unusable: Option<String>,
    pub settings: ModelSettings,
}

impl ModelEntry {
    /// The selector a worker may use.
    pub fn selector(&self) -> ModelRef {
        ModelRef {
            provider: self.provider.clone(),
            id: self.id.clone(),
            display_name: self.display_name.clone(),
        }
    }

    /// What the API may show: never a key, a URL or a header.
    pub fn public_json(&self) -> Value {
        let mut value = json!({"id": self.id, "provider": self.provider});
        if let Some(name) = &self.display_name {
            value["displayName"] = json!(name);
        }
        value
    }

    pub fn is_echo(&self) -> bool {
        self.adapter == Adapter::Echo
    }

    fn echo(settings: ModelSettings) -> Self {
        Self {
            provider: "echo".into(),
            id: "echo".into(),
            display_name: Some(ECHO_DISPLAY_NAME.into()),
            adapter: Adapter::Echo,
            base_url: None,
            api_key: None,
            headers: Vec::new(),
            unusable: None,
            settings,
        }
    }
}

/// The resolved models; the first is the default.
#[derive(Debug, Clone)]
pub struct Catalogue {
    models: Vec<Arc<ModelEntry>>,
}

impl Default for Catalogue {
    /// Only the offline echo model, as when nothing is configured.
    fn default() -> Self {
        let settings = settings_for(&GatewayConfig::default(), &ModelConfig::default(), "echo");
        Self {
            models: vec![Arc::new(ModelEntry::echo(settings))],
        }
    }
}

impl Catalogue {
    pub fn default_model(&self) -> &Arc<ModelEntry> {
        // `resolve` and `default` always put at least one model in the list.
        &self.models[0]
    }

    /// Whether no model is configured at all (the offline default).
    pub fn is_offline(&self) -> bool {
        self.models.len() == 1 && self.models[0].is_echo()
    }

    /// The model with this provider **and** id: the gateway's allow-list check.
    pub fn find(&self, provider: &str, id: &str) -> Option<&Arc<ModelEntry>> {
        self.models
            .iter()
            .find(|m| m.provider == provider && m.id == id)
    }

    /// The models `/api/v1/models` lists: the default first, de-duplicated by `id` only, as
    /// upstream does (api.md §7.6).
    pub fn listed(&self) -> Vec<&Arc<ModelEntry>> {
        let mut seen = std::collections::HashSet::new();
        self.models
            .iter()
            .filter(|m| seen.insert(m.id.as_str()))
            .collect()
    }

    /// Every configured key and header value long enough to be a secret, for masking text
    /// that leaves the server in bulk (shared pages). Placeholders such as `ollama` are short
    /// and would mask ordinary words, so values under eight characters are left out.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = Vec::new();
        for model in &self.models {
            let key = model.api_key.as_ref().map(|k| k.expose().to_owned());
            let headers = model
                .headers
                .iter()
                .filter_map(|(_, v)| v.to_str().ok().map(str::to_owned));
            for value in key.into_iter().chain(headers) {
                if value.len() >= 8 && !secrets.contains(&value) {
                    secrets.push(value);
                }
            }
        }
        secrets
    }

    /// The providers of the configured models.
    pub fn listed_providers(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|m| m.provider.as_str())
    }

    /// The model a session's stored `metadata.modelConfig` selects: its `provider` and `id`
    /// (or the seed's `modelId`) if that pair is configured, otherwise the default (api.md §9).
    pub fn for_selector(&self, model_config: Option<&Value>) -> &Arc<ModelEntry> {
        model_config
            .and_then(selector_of)
            .and_then(|(provider, id)| self.find(&provider, &id))
            .unwrap_or_else(|| self.default_model())
    }
}

/// `(provider, id)` of a `modelConfig`-shaped object; `modelId` is the seed's name for `id`.
pub fn selector_of(value: &Value) -> Option<(String, String)> {
    let provider = value.get("provider")?.as_str()?.trim();
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .or_else(|| value.get("modelId").and_then(Value::as_str))?
        .trim();
    (!provider.is_empty() && !id.is_empty()).then(|| (provider.to_owned(), id.to_owned()))
}

/// Resolves every configured model (agent.md §4.7, "Resolution order").
///
/// # Errors
/// A model without an id in `server.models`, an echo model with another id, an unparsable base
/// URL or a header that is not a valid HTTP header; each names its key.
pub(crate) fn resolve(
    config: &Config,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Catalogue, ConfigError> {
    let mut configured: Vec<(String, ModelConfig, Option<&ProviderConfig>)> = Vec::new();
    if let Some(model) = &config.model {
        let seeds = &model.providers;
        let provider = model
            .provider
            .clone()
            .or_else(|| {
                model
                    .id
                    .is_none()
                    .then(|| seeds.first().map(|s| s.name.clone()))
                    .flatten()
            })
            .unwrap_or_else(|| DEFAULT_PROVIDER.into());
        let seed = seeds.iter().find(|s| s.name == provider);
        let id = model
            .id
            .clone()
            .or_else(|| seed.and_then(|s| s.models.first().cloned()))
            .unwrap_or_else(|| {
                if provider == "echo" {
                    "echo".into()
                } else {
                    DEFAULT_MODEL_ID.into()
                }
            });
        let default = ModelConfig {
            provider: Some(provider),
            id: Some(id),
            ..model.clone()
        };
        configured.push(("model".into(), default, seed));
        for (i, seed) in seeds.iter().enumerate() {
            for id in &seed.models {
                let entry = ModelConfig {
                    provider: Some(seed.name.clone()),
                    id: Some(id.clone()),
                    ..ModelConfig::default()
                };
                configured.push((format!("model.providers[{i}]"), entry, Some(seed)));
            }
        }
    }
    for (i, model) in config.server.models.iter().enumerate() {
        let key = format!("server.models[{i}]");
        if model.id.as_deref().is_none_or(|id| id.trim().is_empty()) {
            return Err(ConfigError::Invalid(format!("{key}.id is required")));
        }
        let entry = ModelConfig {
            provider: Some(
                model
                    .provider
                    .clone()
                    .unwrap_or_else(|| DEFAULT_PROVIDER.into()),
            ),
            ..model.clone()
        };
        configured.push((key, entry, None));
    }
    if configured.is_empty() {
        return Ok(Catalogue::default());
    }
    let mut models: Vec<Arc<ModelEntry>> = Vec::new();
    for (key, model, seed) in &configured {
        let entry = resolve_one(config, key, model, *seed, env)?;
        if models
            .iter()
            .all(|m| m.provider != entry.provider || m.id != entry.id)
        {
            models.push(Arc::new(entry));
        }
    }
    Ok(Catalogue { models })
}

fn settings_for(gateway: &GatewayConfig, model: &ModelConfig, provider: &str) -> ModelSettings {
    let spec = spec(provider);
    ModelSettings {
        max_tokens: model.max_tokens,
        context_window: model.context_window,
        stream_usage: model.stream_usage.unwrap_or(spec.stream_usage),
        passback: model.reasoning_passback.unwrap_or(spec.passback),
        send_thinking: model.send_thinking,
        thinking: model.thinking.clone(),
        streaming: spec.streaming,
        tools: spec.tools,
        api_version: model
            .api_version
            .clone()
            .unwrap_or_else(|| DEFAULT_AZURE_API_VERSION.into()),
        max_attempts: model.max_attempts.unwrap_or(gateway.max_attempts).max(1),
        retry_base_delay: Duration::from_millis(gateway.retry_base_delay_ms),
        timeouts: Timeouts::resolve(&gateway.timeouts, model.timeouts.as_ref()),
        params: model.params.clone().unwrap_or_default(),
    }
}

/// Whether a configured key is really the name of an environment variable (upstream CLI's
/// `resolveValue`).
fn names_env_var(value: &str) -> bool {
    let mut bytes = value.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

fn resolve_one(
    config: &Config,
    key: &str,
    model: &ModelConfig,
    seed: Option<&ProviderConfig>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<ModelEntry, ConfigError> {
    let provider = model
        .provider
        .clone()
        .unwrap_or_else(|| DEFAULT_PROVIDER.into());
    let id = model.id.clone().unwrap_or_else(|| DEFAULT_MODEL_ID.into());
    let spec = spec(&provider);
    let settings = settings_for(&config.gateway, model, &provider);
    if spec.adapter == Adapter::Echo {
        if id != "echo" {
            return Err(ConfigError::Invalid(format!(
                "{key}.id must be \"echo\" for the echo provider"
            )));
        }
        let mut echo = ModelEntry::echo(settings);
        if model.display_name.is_some() {
            echo.display_name.clone_from(&model.display_name);
        }
        return Ok(echo);
    }

    let base_url = model
        .base_url
        .clone()
        .or_else(|| seed.and_then(|s| s.base_url.clone()))
        .or_else(|| spec.base_env.and_then(env))
        .or_else(|| spec.default_base.map(str::to_owned))
        .map(|url| url.trim().trim_end_matches('/').to_owned())
        .filter(|url| !url.is_empty());
    if let Some(url) = &base_url {
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            ConfigError::Invalid(format!("{key}.baseURL {url:?} is not a URL: {e}"))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid(format!(
                "{key}.baseURL {url:?} must be an http or https URL"
            )));
        }
    }

    let mut unusable = None;
    let configured_key = model
        .api_key
        .clone()
        .or_else(|| seed.and_then(|s| s.api_key.clone()));
    let api_key = match configured_key {
        Some(value) if names_env_var(value.expose()) => {
            let name = value.expose();
            let found = env(name).filter(|v| !v.is_empty()).map(Secret::new);
            if found.is_none() {
                unusable = Some(format!(
                    "{key}.apiKey names the environment variable {name}, which is not set"
                ));
            }
            found
        }
        Some(value) if !value.expose().is_empty() => Some(value),
        _ => match seed.and_then(|s| s.api_key_env.as_deref()) {
            Some(name) => {
                let found = env(name).filter(|v| !v.is_empty()).map(Secret::new);
                if found.is_none() {
                    unusable = Some(format!(
                        "the API key variable {name} of provider {provider} is not set"
                    ));
                }
                found
            }
            None => spec.placeholder.map(Secret::new).or_else(|| {
                spec.key_env
                    .and_then(env)
                    .filter(|v| !v.is_empty())
                    .map(Secret::new)
            }),
        },
    };
    if unusable.is_none() && api_key.is_none() && spec.key_required {
        let hint = spec
            .key_env
            .map(|var| format!(" or the environment variable {var}"))
            .unwrap_or_default();
        unusable = Some(format!(
            "no API key is configured for provider {provider}: set {key}.apiKey{hint}"
        ));
    }
    if base_url.is_none() {
        unusable = Some(format!(
            "provider {provider} has no default base URL: set {key}.baseURL"
        ));
    }

    let mut headers = Vec::new();
    for (name, value) in &model.headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            ConfigError::Invalid(format!("{key}.headers: {name:?} is not a header name"))
        })?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            ConfigError::Invalid(format!("{key}.headers.{name}: not a valid header value"))
        })?;
        value.set_sensitive(true);
        headers.push((header, value));
    }

    Ok(ModelEntry {
        provider,
        id,
        display_name: model.display_name.clone(),
        adapter: spec.adapter,
        base_url,
        api_key,
        headers,
        unusable,
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, load_with_env};
    use std::collections::HashMap;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, text).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        load_with_env(Some(&path), &Overrides::default(), |k| env.get(k).cloned())
    }

    #[test]
    fn nothing_configured_is_echo() {
        let c = load("{}", &[("OPENAI_API_KEY", "sk-unused")]).unwrap();
        assert!(c.catalogue.is_offline());
        assert_eq!(c.default_model().provider, "echo");
    }

    #[test]
    fn env_vars_select_and_key_the_model() {
        let c = load(
            "{}",
            &[("MODEL_ID", "gpt-4o-mini"), ("OPENAI_API_KEY", "sk-abc")],
        )
        .unwrap();
        let m = c.catalogue.default_model();
        assert_eq!(
            (m.provider.as_str(), m.id.as_str()),
            ("openai", "gpt-4o-mini")
        );
        assert_eq!(m.api_key.as_ref().map(Secret::expose), Some("sk-abc"));
        assert_eq!(m.base_url.as_deref(), Some("https://api.openai.com/v1"));
        assert!(m.unusable.is_none());

        let c = load(
            "{}",
            &[
                ("MODEL_PROVIDER", "openai"),
                ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
            ],
        )
        .unwrap();
        let m = c.catalogue.default_model();
        assert_eq!(m.base_url.as_deref(), Some("http://127.0.0.1:9/v1"));
        assert!(m.unusable.as_deref().unwrap().contains("OPENAI_API_KEY"));
    }

    #[test]
    fn keys_never_cross_providers() {
        let c = load(
            r#"{"model":{"provider":"deepseek","id":"deepseek-chat"}}"#,
            &[("OPENAI_API_KEY", "sk-openai")],
        )
        .unwrap();
        let m = c.catalogue.default_model();
        assert!(m.api_key.is_none());
        assert!(m.unusable.as_deref().unwrap().contains("DEEPSEEK_API_KEY"));
    }

    #[test]
    fn an_upper_case_key_names_a_variable() {
        let c = load(
            r#"{"model":{"provider":"anthropic","id":"claude","apiKey":"MY_KEY"}}"#,
            &[("MY_KEY", "k-1")],
        )
        .unwrap();
        let m = c.catalogue.default_model();
        assert_eq!(m.api_key.as_ref().map(Secret::expose), Some("k-1"));
        assert_eq!(m.adapter, Adapter::Anthropic);
        let c = load(
            r#"{"model":{"provider":"anthropic","id":"claude","apiKey":"MY_KEY"}}"#,
            &[],
        )
        .unwrap();
        assert!(c.catalogue.default_model().unusable.is_some());
    }

    #[test]
    fn seed_providers_and_server_models_are_selectable() {
        let c = load(
            r#"{"model":{"provider":"local","id":"a","providers":[
                    {"name":"local","baseURL":"http://127.0.0.1:1/v1","apiKeyEnv":"LOCAL_KEY","models":["a","b"]}]},
                "server":{"models":[{"provider":"ollama","id":"llama3"},{"provider":"local","id":"a","displayName":"dup"}]}}"#,
            &[("LOCAL_KEY", "lk")],
        )
        .unwrap();
        let cat = &c.catalogue;
        let ids: Vec<_> = cat.listed().iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids, ["a", "b", "llama3"]);
        let b = cat.find("local", "b").unwrap();
        assert_eq!(b.base_url.as_deref(), Some("http://127.0.0.1:1/v1"));
        assert_eq!(b.api_key.as_ref().map(Secret::expose), Some("lk"));
        let default = cat.default_model();
        assert_eq!(default.api_key.as_ref().map(Secret::expose), Some("lk"));
        let ollama = cat.find("ollama", "llama3").unwrap();
        assert_eq!(ollama.api_key.as_ref().map(Secret::expose), Some("ollama"));
        assert!(cat.find("openai", "a").is_none());
        let picked = cat.for_selector(Some(&json!({"provider": "local", "modelId": "b"})));
        assert_eq!(picked.id, "b");
        let fallback = cat.for_selector(Some(&json!({"provider": "x", "id": "b"})));
        assert_eq!(fallback.id, "a");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = load(r#"{"model":{"baseURL":"not a url"}}"#, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.baseURL"), "{err}");
        let err = load(r#"{"server":{"models":[{"provider":"openai"}]}}"#, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.models[0].id"), "{err}");
        let err = load(r#"{"model":{"provider":"echo","id":"x"}}"#, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("echo"), "{err}");
        let err = load(r#"{"model":{"headers":{"bad header":"x"}}}"#, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.headers"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = load(r#"{"model":{"apiKey":"sk-very-secret-value"}}"#, &[]).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("sk-very-secret-value"), "{dump}");
    }

    #[test]
    fn timeouts_layer_model_over_global() {
        let c = load(
            r#"{"model":{"provider":"ollama","id":"x","timeouts":{"idleMs":5}},
                "gateway":{"maxAttempts":1,"timeouts":{"headersMs":7}}}"#,
            &[],
        )
        .unwrap();
        let s = &c.catalogue.default_model().settings;
        assert_eq!(s.timeouts.idle, Duration::from_millis(5));
        assert_eq!(s.timeouts.headers, Duration::from_millis(7));
        assert_eq!(s.timeouts.connect, Duration::from_secs(10));
        assert_eq!(s.max_attempts, 1);
    }
}

//! Server configuration: the seed's `appConfig` shape (camelCase keys), read from a TOML, YAML or
//! JSON file, then the seed's environment variables, then command-line flags, later sources
//! overriding earlier ones (ARCHITECTURE decision 10). All defaults live here.
//!
//! A bad file, value or variable stops the server before it binds, with a message that names
//! the key and the problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Json, Serialized, Toml, Yaml};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use shared::protocol::ModelRef;

pub use crate::catalogue::Catalogue;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Root directory under which each session gets its own workspace directory.
    #[serde(default = "default_workspace")]
    pub workspace: PathBuf,
    /// Agent name shown in session metadata and `agent_run_start`.
    #[serde(default)]
    pub name: Option<String>,
    /// System prompt instructions for the agent.
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub server: ServerConfig,
    /// The default model; absent (and no `server.models`) means the built-in offline `echo` model.
    #[serde(default)]
    pub model: Option<ModelConfig>,
    /// Retries and timeouts of model calls (ours; agent.md §4.11).
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// AGIO monitoring (api.md §15); off unless `agio.provider` is set.
    #[serde(default)]
    pub agio: AgioConfig,
    /// The web UI served on every non-API path (api.md §11.2); absent, the built-in UI.
    #[serde(default)]
    pub webui: Option<WebUiConfig>,
    /// Session sharing (api.md §10).
    #[serde(default)]
    pub share: ShareConfig,
    #[serde(default)]
    pub log_level: Option<LogLevel>,
    /// Every model this server may call, resolved at load time with the environment's keys
    /// (agent.md §4.7). Filled by [`load_with_env`]; never serialised.
    #[serde(skip)]
    pub catalogue: Catalogue,
    /// Isolation level, per-session limits and commands (all of it in `crate::isolation`).
    #[serde(default)]
    pub isolation: crate::isolation::IsolationConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Refuse new sessions while any session runs a query (api.md §2.2).
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub storage: StorageConfig,
    /// Upstream's extra selectable models (`server.models[]`), same shape as `model`.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// How many workers live at once, and for how long they idle.
    #[serde(default)]
    pub workers: WorkerPolicy,
    /// Seconds running runs get to finish after SIGTERM before they are aborted.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// The control socket of `supervisor ctl`; its directory is created with mode 0700.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// The per-session runtime settings the UI offers (api.md §7.4): `{schema}`.
    #[serde(default)]
    pub runtime_settings: Option<RuntimeSettingsConfig>,
    /// A second origin (`scheme://host[:port]`) that reaches this same server, for workspace
    /// files: requests arriving under it get agent-written pages (HTML, SVG, ...) inline, still
    /// sandboxed. Absent, such files are always downloads, so none renders on the API's origin.
    #[serde(default)]
    pub workspace_origin: Option<String>,
}

impl ServerConfig {
    /// `workspaceOrigin`, parsed (it was checked at load time).
    pub fn workspace_origin(&self) -> Option<WorkspaceOrigin> {
        self.workspace_origin
            .as_deref()
            .and_then(|o| WorkspaceOrigin::parse(o).ok())
    }
}

/// The host and port of `server.workspaceOrigin`, to recognise requests made under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceOrigin {
    /// Lower case; an IPv6 address in brackets.
    host: String,
    port: u16,
    /// What a `Host` without a port means: the default port of the origin's scheme.
    scheme_port: u16,
}

impl WorkspaceOrigin {
    /// # Errors
    /// Not an http(s) origin: a scheme, a host, an optional port, nothing else.
    pub fn parse(origin: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(origin).map_err(|e| e.to_string())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("the scheme must be http or https".into());
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err("an origin has no path, query or fragment".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("an origin has no user name or password".into());
        }
        let host = url.host_str().ok_or("no host")?.to_ascii_lowercase();
        let port = url.port_or_known_default().ok_or("no port")?;
        let scheme_port = if url.scheme() == "https" { 443 } else { 80 };
        Ok(Self {
            host,
            port,
            scheme_port,
        })
    }

    /// Whether a request's `Host` header (`host`, `host:port`, `[v6]:port`) names this origin.
    pub fn matches_host(&self, header: &str) -> bool {
        let (host, port) = match header.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, port.parse::<u16>().ok()),
            _ => (header, None),
        };
        host.eq_ignore_ascii_case(&self.host) && port.unwrap_or(self.scheme_port) == self.port
    }
}

/// Where `supervisor ctl` finds the server by default.
pub fn default_control_socket() -> PathBuf {
    PathBuf::from("./data/ctl.sock")
}

/// Worker lifecycle under load (`server.workers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPolicy {
    /// An idle worker is stopped after this many seconds (0: never); the next query starts a
    /// new one, which rebuilds the conversation from the log.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Most live workers; past it, the least recently used idle one is stopped to make room,
    /// and when none is idle the query is refused with 429.
    #[serde(default = "default_max_workers")]
    pub max: usize,
    /// A new worker is refused (429) while the host has less memory available than this.
    #[serde(default = "default_min_free_memory")]
    pub min_free_memory_mb: u64,
}

impl Default for WorkerPolicy {
    fn default() -> Self {
        Self {
            idle_timeout_secs: default_idle_timeout(),
            max: default_max_workers(),
            min_free_memory_mb: default_min_free_memory(),
        }
    }
}

fn default_idle_timeout() -> u64 {
    600
}
fn default_max_workers() -> usize {
    1024
}
fn default_min_free_memory() -> u64 {
    128
}
fn default_shutdown_grace() -> u64 {
    10
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            exclusive: false,
            storage: StorageConfig::default(),
            models: Vec::new(),
            workers: WorkerPolicy::default(),
            shutdown_grace_secs: default_shutdown_grace(),
            control_socket: default_control_socket(),
            runtime_settings: None,
            workspace_origin: None,
        }
    }
}

/// `server.runtimeSettings`: the JSON-Schema-like description of the settings a session may
/// carry. Upstream also takes a `transform` function, which a declarative config cannot hold:
/// settings are stored and shown, and reach no agent option.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSettingsConfig {
    pub schema: Value,
}

/// `webui`: upstream's web UI config object. Only `type`, `staticPath` and `base` mean
/// something to the server; every other key (`title`, `welcomTitle`, `layout`, ...) is for
/// the browser and is passed to it as given, so the object is kept whole.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebUiConfig(pub Map<String, Value>);

impl WebUiConfig {
    /// `webui.type`; upstream's CLI fills in `static`.
    pub fn kind(&self) -> &str {
        self.0
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("static")
    }

    /// The directory holding the UI's `index.html`; absent means the built-in UI.
    pub fn static_path(&self) -> Option<PathBuf> {
        self.0
            .get("staticPath")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    /// The route prefix the UI is served under (api.md §11.2 step 1), trailing `/` dropped.
    pub fn base(&self) -> Option<&str> {
        self.0
            .get("base")
            .and_then(Value::as_str)
            .map(|b| b.trim_end_matches('/'))
            .filter(|b| !b.is_empty())
    }
}

/// `share`: where shared sessions are uploaded (api.md §10); unset, they are only downloaded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShareConfig {
    #[serde(default)]
    pub provider: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StorageConfig {
    #[serde(rename = "type", default)]
    pub kind: StorageKind,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl StorageConfig {
    /// Where the backend keeps its data: the configured path, or `./data/sessions` (a
    /// directory, for `file`) or `./data/sessions.db` (for `sqlite`).
    pub fn resolved_path(&self) -> PathBuf {
        match (&self.path, self.kind) {
            (Some(path), _) => path.clone(),
            (None, StorageKind::Sqlite) => PathBuf::from("./data/sessions.db"),
            (None, _) => PathBuf::from("./data/sessions"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    Memory,
    File,
    Sqlite,
}

/// One model as configured (`model`, each of `server.models[]`): upstream's `AgentModel` plus
/// our per-model settings (agent.md §4.7). Only `provider`, `id` and `displayName` are ever shown.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    /// A key, or the name of the environment variable holding it (`^[A-Z][A-Z0-9_]*$`).
    /// Never shown by any endpoint and never given to a worker.
    #[serde(default)]
    pub api_key: Option<Secret>,
    #[serde(default, rename = "baseURL", alias = "baseUrl")]
    pub base_url: Option<String>,
    /// Extra request headers (for example OpenRouter's `HTTP-Referer`); never shown either.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Merged into the request body at top level (upstream's experimental `params`).
    #[serde(default)]
    pub params: Option<Map<String, Value>>,
    /// The seed's provider list (`model.providers[]`): each model of each entry becomes a
    /// selectable model. Read on the top-level `model` only.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// `max_tokens` of each call (Anthropic needs one: 8192 when unset).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// The model's context window in tokens, for the worker's trimming budget.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// Ask OpenAI-compatible servers for a usage chunk (default true, false for perplexity).
    #[serde(default)]
    pub stream_usage: Option<bool>,
    /// Which assistant turns keep their `reasoning_content` on OpenAI-compatible requests.
    #[serde(default)]
    pub reasoning_passback: Option<ReasoningPassback>,
    /// Force sending (or never sending) the `thinking` field to OpenAI-compatible servers.
    #[serde(default)]
    pub send_thinking: Option<bool>,
    /// Tarko's `thinking` option for this model: `{type: "enabled"|"disabled", budgetTokens?}`.
    #[serde(default)]
    pub thinking: Option<Value>,
    /// Azure's `api-version` query parameter.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Attempts per call for this model (overrides `gateway.maxAttempts`).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Timeouts for this model (override `gateway.timeouts`; `connectMs` is global only).
    #[serde(default)]
    pub timeouts: Option<TimeoutsConfig>,
}

/// An entry of the seed's `model.providers[]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfig {
    pub name: String,
    #[serde(default, rename = "baseURL", alias = "baseUrl")]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// The environment variable holding the key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningPassback {
    None,
    ToolCalls,
    All,
}

/// A configured secret. Its `Debug` and `Serialize` never show the value, so no log line, error
/// or dump of the configuration can leak it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it: the outgoing request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

/// `gateway`: how model calls are retried and timed out (agent.md §4.11).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    /// Attempts per call in total (1 = no retry).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The first backoff delay; it doubles per retry up to 8 s, with ±25 % jitter.
    #[serde(default = "default_retry_base_delay_ms")]
    pub retry_base_delay_ms: u64,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            retry_base_delay_ms: default_retry_base_delay_ms(),
            timeouts: TimeoutsConfig::default(),
        }
    }
}

/// Per-attempt timeouts in milliseconds; unset means the default of agent.md §4.11.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsConfig {
    /// TCP (and TLS) connect: 10 s.
    #[serde(default)]
    pub connect_ms: Option<u64>,
    /// Until the response headers: 300 s (local servers may load the model first).
    #[serde(default)]
    pub headers_ms: Option<u64>,
    /// Between two reads of the body: 300 s (reasoning models may be silent a long time).
    #[serde(default)]
    pub idle_ms: Option<u64>,
    /// The whole attempt: 20 min.
    #[serde(default)]
    pub total_ms: Option<u64>,
}

/// `agio`: where AGIO events go (agent.md §6).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgioConfig {
    /// The collector URL; unset turns AGIO off.
    #[serde(default)]
    pub provider: Option<String>,
    /// Whether `agent_run_start.input` carries the user's text (privacy switch).
    #[serde(default = "default_true")]
    pub include_input: bool,
}

impl Default for AgioConfig {
    fn default() -> Self {
        Self {
            provider: None,
            include_input: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_filter(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

fn default_workspace() -> PathBuf {
    PathBuf::from("./workspace")
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    3000
}
fn default_max_iterations() -> u32 {
    1000
}
fn default_temperature() -> f64 {
    0.7
}
fn default_max_attempts() -> u32 {
    3
}
fn default_retry_base_delay_ms() -> u64 {
    500
}
fn default_true() -> bool {
    true
}

/// The model used when none is configured (agent.md §4.12).
pub fn echo_model() -> ModelRef {
    ModelRef {
        provider: "echo".into(),
        id: "echo".into(),
        display_name: Some("Echo (offline test model, no LLM configured)".into()),
    }
}

impl Config {
    /// The default model as the worker may name it.
    pub fn default_model(&self) -> ModelRef {
        self.catalogue.default_model().selector()
    }

    /// The agent's name, as upstream resolves it when no implementation label exists.
    pub fn agent_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| "Anonymous".into())
    }
}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub workspace: Option<PathBuf>,
    pub storage_type: Option<String>,
    pub storage_path: Option<PathBuf>,
    pub exclusive: bool,
    pub model_provider: Option<String>,
    pub model_id: Option<String>,
    pub log_level: Option<String>,
    /// `webui.staticPath`: serve this UI directory (the official UI's `static/`) instead of the
    /// built-in one.
    pub webui_static_path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("config file {path} has an unknown extension; use .toml, .yaml, .yml or .json")]
    UnknownFormat { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid environment variable {name}={value:?}: {problem}")]
    Env {
        name: &'static str,
        value: String,
        problem: String,
    },
}

/// Reads the configuration from `file` (if any), the process environment and `flags`.
///
/// # Errors
/// A missing or unparsable file, or any value of the wrong type or out of range, naming the key.
pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Config, ConfigError> {
    load_with_env(file, flags, |name| std::env::var(name).ok())
}

/// [`load`] with the environment injected, so tests need not touch the process environment.
pub fn load_with_env(
    file: Option<&Path>,
    flags: &Overrides,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile {
                path: path.to_owned(),
            });
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        figment = match ext.as_deref() {
            Some("toml") => figment.merge(Toml::file_exact(path)),
            Some("yaml" | "yml") => figment.merge(Yaml::file_exact(path)),
            Some("json") => figment.merge(Json::file_exact(path)),
            _ => {
                return Err(ConfigError::UnknownFormat {
                    path: path.to_owned(),
                });
            }
        };
    }
    figment = figment.merge(Serialized::defaults(env_layer(&env)?));
    figment = figment.merge(Serialized::defaults(flag_layer(flags)));
    let mut config: Config = figment
        .extract()
        .map_err(|e| ConfigError::Invalid(describe(&e)))?;
    validate(&config)?;
    config.catalogue = crate::catalogue::resolve(&config, &env)?;
    Ok(config)
}

/// figment names the failing key as `default.server.port`; the profile prefix means nothing to
/// our users, so it is dropped.
fn describe(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| e.to_string().replace("key \"default.", "key \""))
        .collect::<Vec<_>>()
        .join("; ")
}

fn validate(config: &Config) -> Result<(), ConfigError> {
    if config.server.host.trim().is_empty() {
        return Err(ConfigError::Invalid("server.host must not be empty".into()));
    }
    if config.server.workers.max == 0 {
        return Err(ConfigError::Invalid(
            "server.workers.max must be at least 1".into(),
        ));
    }
    if config.max_iterations == 0 {
        return Err(ConfigError::Invalid(
            "maxIterations must be at least 1".into(),
        ));
    }
    let storage = &config.server.storage;
    if storage.kind == StorageKind::File
        && storage
            .path
            .as_ref()
            .is_some_and(|p| p.extension().is_some_and(|e| e == "json"))
    {
        return Err(ConfigError::Invalid(
            "server.storage.path of the file backend is a directory; to bring over an upstream \
             tarko.json, run `supervisor import --from <file>`"
                .into(),
        ));
    }
    if config.gateway.max_attempts == 0 {
        return Err(ConfigError::Invalid(
            "gateway.maxAttempts must be at least 1".into(),
        ));
    }
    if let Some(url) = &config.agio.provider
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(ConfigError::Invalid(format!(
            "agio.provider must be an http(s) URL, got {url:?}"
        )));
    }
    if let Some(url) = &config.share.provider
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(ConfigError::Invalid(format!(
            "share.provider must be an http(s) URL, got {url:?}"
        )));
    }
    if let Some(settings) = &config.server.runtime_settings
        && !settings.schema.is_object()
    {
        return Err(ConfigError::Invalid(
            "server.runtimeSettings.schema must be an object".into(),
        ));
    }
    if let Some(webui) = &config.webui {
        validate_webui(webui)?;
    }
    if let Some(origin) = &config.server.workspace_origin
        && let Err(reason) = WorkspaceOrigin::parse(origin)
    {
        return Err(ConfigError::Invalid(format!(
            "server.workspaceOrigin must be an http(s) origin like \"https://files.example.com\", \
             got {origin:?}: {reason}"
        )));
    }
    Ok(())
}

/// The UI must be one we can serve: a static directory with an `index.html`. Checked at start
/// so that a wrong path is a clear message, not a 404 for every page.
fn validate_webui(webui: &WebUiConfig) -> Result<(), ConfigError> {
    if webui.kind() != "static" {
        return Err(ConfigError::Invalid(format!(
            "webui.type {:?} is not supported; use \"static\" with webui.staticPath",
            webui.kind()
        )));
    }
    if let Some(base) = webui.0.get("base")
        && !base
            .as_str()
            .is_some_and(|b| b.starts_with('/') || b.starts_with('^'))
    {
        return Err(ConfigError::Invalid(format!(
            "webui.base must be a path starting with /, got {base}"
        )));
    }
    if let Some(dir) = webui.static_path()
        && !dir.join("index.html").is_file()
    {
        return Err(ConfigError::Invalid(format!(
            "webui.staticPath {} has no index.html (run scripts/fetch-webui.sh for the official UI)",
            dir.display()
        )));
    }
    Ok(())
}

/// The seed's environment variables, as a partial config tree.
fn env_layer(env: &impl Fn(&str) -> Option<String>) -> Result<Value, ConfigError> {
    let mut layer = json!({});
    if let Some(port) = env("PORT") {
        let parsed = port.trim().parse::<u16>().map_err(|e| ConfigError::Env {
            name: "PORT",
            value: port.clone(),
            problem: format!("not a port number ({e})"),
        })?;
        layer["server"]["port"] = json!(parsed);
    }
    if let Some(host) = env("HOST") {
        layer["server"]["host"] = json!(host);
    }
    if let Some(workspace) = env("WORKSPACE_PATH") {
        layer["workspace"] = json!(workspace);
    }
    if let Some(kind) = env("STORAGE_TYPE") {
        let kind = kind.trim().to_ascii_lowercase();
        if !matches!(kind.as_str(), "memory" | "file" | "sqlite") {
            return Err(ConfigError::Env {
                name: "STORAGE_TYPE",
                value: kind,
                problem: "server.storage.type must be memory, file or sqlite".into(),
            });
        }
        layer["server"]["storage"]["type"] = json!(kind);
    }
    if let Some(path) = env("STORAGE_PATH") {
        layer["server"]["storage"]["path"] = json!(path);
    }
    if let Some(provider) = env("MODEL_PROVIDER") {
        layer["model"]["provider"] = json!(provider);
    }
    if let Some(id) = env("MODEL_ID") {
        layer["model"]["id"] = json!(id);
    }
    Ok(layer)
}

fn flag_layer(flags: &Overrides) -> Value {
    let mut layer = json!({});
    if let Some(host) = &flags.host {
        layer["server"]["host"] = json!(host);
    }
    if let Some(port) = flags.port {
        layer["server"]["port"] = json!(port);
    }
    if let Some(workspace) = &flags.workspace {
        layer["workspace"] = json!(workspace);
    }
    if let Some(kind) = &flags.storage_type {
        layer["server"]["storage"]["type"] = json!(kind);
    }
    if let Some(path) = &flags.storage_path {
        layer["server"]["storage"]["path"] = json!(path);
    }
    if flags.exclusive {
        layer["server"]["exclusive"] = json!(true);
    }
    if let Some(provider) = &flags.model_provider {
        layer["model"]["provider"] = json!(provider);
    }
    if let Some(id) = &flags.model_id {
        layer["model"]["id"] = json!(id);
    }
    if let Some(level) = &flags.log_level {
        layer["logLevel"] = json!(level);
    }
    if let Some(path) = &flags.webui_static_path {
        layer["webui"]["staticPath"] = json!(path);
    }
    layer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load_str(
        ext: &str,
        text: &str,
        env: &[(&str, &str)],
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("c.{ext}"));
        std::fs::write(&path, text).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        load_with_env(Some(&path), flags, |k| env.get(k).cloned())
    }

    #[test]
    fn workspace_origins() {
        let origin = WorkspaceOrigin::parse("https://Files.Example.com").unwrap();
        assert!(origin.matches_host("files.example.com"));
        assert!(origin.matches_host("files.example.com:443"));
        assert!(!origin.matches_host("files.example.com:80"));
        assert!(!origin.matches_host("example.com"));
        let local = WorkspaceOrigin::parse("http://localhost:8080").unwrap();
        assert!(local.matches_host("localhost:8080") && !local.matches_host("localhost"));
        let v6 = WorkspaceOrigin::parse("http://[::1]:9000").unwrap();
        assert!(v6.matches_host("[::1]:9000") && !v6.matches_host("[::1]"));
        for bad in [
            "files.example.com",
            "ftp://a",
            "https://a/path",
            "https://a?x=1",
            "https://u@a",
        ] {
            assert!(WorkspaceOrigin::parse(bad).is_err(), "{bad}");
        }
        let refused = load_str(
            "json",
            r#"{"server": {"workspaceOrigin": "https://a/x"}}"#,
            &[],
            &Overrides::default(),
        );
        assert!(
            matches!(&refused, Err(ConfigError::Invalid(m)) if m.contains("server.workspaceOrigin")),
            "{refused:?}"
        );
    }

    #[test]
    fn defaults_without_any_source() {
        let c = load_with_env(None, &Overrides::default(), |_| None).unwrap();
        assert_eq!(c.server.port, 3000);
        assert_eq!(c.server.host, "127.0.0.1");
        assert_eq!(c.workspace, PathBuf::from("./workspace"));
        assert_eq!(c.server.storage.kind, StorageKind::Memory);
        assert_eq!(c.default_model().provider, "echo");
    }

    #[test]
    fn file_then_env_then_flags() {
        let toml = "workspace = \"/f\"\n[server]\nport = 4000\nexclusive = true\n[model]\nprovider = \"openai\"\nid = \"gpt-4o\"\n";
        let c = load_str(
            "toml",
            toml,
            &[("PORT", "5000"), ("WORKSPACE_PATH", "/e")],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.server.port, 5000);
        assert_eq!(c.workspace, PathBuf::from("/e"));
        assert!(c.server.exclusive);
        assert_eq!(c.default_model().id, "gpt-4o");

        let flags = Overrides {
            port: Some(6000),
            ..Overrides::default()
        };
        let c = load_str("toml", toml, &[("PORT", "5000")], &flags).unwrap();
        assert_eq!(c.server.port, 6000);
    }

    #[test]
    fn yaml_and_json_are_read() {
        let c = load_str(
            "yaml",
            "server:\n  port: 4100\n",
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.server.port, 4100);
        let c = load_str(
            "json",
            r#"{"server":{"port":4200},"logLevel":"debug"}"#,
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.server.port, 4200);
        assert_eq!(c.log_level, Some(LogLevel::Debug));
    }

    #[test]
    fn errors_name_the_key() {
        let err = load_str(
            "toml",
            "[server]\nport = \"abc\"\n",
            &[],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.port"), "{err}");
        let err = load_str(
            "toml",
            "[server]\nport = 99999\n",
            &[],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.port"), "{err}");
        let err = load_str(
            "json",
            r#"{"server":{"storage":{"type":"mongo"}}}"#,
            &[],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.storage.type"), "{err}");
        let err = load_str("toml", "", &[("PORT", "x")], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("PORT"), "{err}");
        let err = load_str(
            "toml",
            "",
            &[("STORAGE_TYPE", "bogus")],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("storage"), "{err}");
        let err = load_str("yaml", "server: [1, 2\n", &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid configuration"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = load_with_env(
            Some(Path::new("/nope/c.toml")),
            &Overrides::default(),
            |_| None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nope/c.toml"));
    }
}

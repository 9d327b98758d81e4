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

pub mod auth;
pub mod catalogue;
pub mod tenants;

use crate::isolation::ByteSize;
pub use catalogue::Catalogue;

/// The whole configuration.
///
/// Every section refuses keys it does not know (a typo must not be silently ignored); the
/// objects that are open by design are `webui` (extra keys go to the browser),
/// `server.runtimeSettings.schema`, and a model's `headers`, `params` and `thinking`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The seed's agent implementation: absent or `"builtin"`, the only agent this server has.
    #[serde(default)]
    pub agent: Option<String>,
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
    /// How callers prove who they are (`crate::auth`); absent, local mode.
    #[serde(default)]
    pub auth: Option<auth::AuthConfig>,
    /// `[tenants.<name>]`: quotas, rate limits and provider keys per tenant
    /// (`config::tenants`).
    #[serde(default)]
    pub tenants: BTreeMap<String, tenants::TenantConfig>,
    /// The tenants' sections resolved, with their keys. Filled by [`load_with_env`]; never
    /// serialised.
    #[serde(skip)]
    pub tenant_limits: tenants::Tenants,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
    /// The server's own files: the control socket, the `file` and `sqlite` stores unless
    /// their paths are set, and the jail stage. Created 0700; relative to the working directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The control socket of `supervisor ctl`; `<dataDir>/ctl.sock` unless set. Its directory
    /// is created with mode 0700.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// The per-session runtime settings the UI offers (api.md §7.4): `{schema}`.
    #[serde(default)]
    pub runtime_settings: Option<RuntimeSettingsConfig>,
    /// What one session may send through its worker.
    #[serde(default)]
    pub session_limits: SessionLimits,
    /// How long a connection may take to send a request, or sit idle between requests.
    #[serde(default)]
    pub http: HttpTimeouts,
    /// A second origin (`scheme://host[:port]`) that reaches this same server, for workspace
    /// files: requests arriving under it get agent-written pages (HTML, SVG, ...) inline, still
    /// sandboxed. Absent, such files are always downloads, so none renders on the API's origin.
    #[serde(default)]
    pub workspace_origin: Option<String>,
    /// Origins (`scheme://host[:port]`) besides the server's own whose pages may call the API
    /// from a browser; they get CORS answers. Any other `Origin` is refused.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Host names this server answers to besides the loopback ones (a name in `/etc/hosts`, the
    /// name a reverse proxy forwards): any other `Host` is refused, which stops DNS rebinding.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Serve a non-loopback address without any `[auth]` method (`--allow-unauthenticated`):
    /// for a server behind something else that authenticates. Logged and shown in health.
    #[serde(default)]
    pub allow_unauthenticated: bool,
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

/// Why a `server.workspaceOrigin` is not an http(s) origin.
#[derive(Debug, thiserror::Error)]
pub enum InvalidOrigin {
    #[error("{0}")]
    Url(#[source] <reqwest::Url as std::str::FromStr>::Err),
    #[error("the scheme must be http or https")]
    Scheme,
    #[error("an origin has no path, query or fragment")]
    Path,
    #[error("an origin has no user name or password")]
    Credentials,
    #[error("no host")]
    NoHost,
    #[error("no port")]
    NoPort,
}

impl WorkspaceOrigin {
    /// # Errors
    /// Not an http(s) origin: a scheme, a host, an optional port, nothing else.
    pub fn parse(origin: &str) -> Result<Self, InvalidOrigin> {
        let url = reqwest::Url::parse(origin).map_err(InvalidOrigin::Url)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(InvalidOrigin::Scheme);
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(InvalidOrigin::Path);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(InvalidOrigin::Credentials);
        }
        let host = url
            .host_str()
            .ok_or(InvalidOrigin::NoHost)?
            .to_ascii_lowercase();
        let port = url.port_or_known_default().ok_or(InvalidOrigin::NoPort)?;
        let scheme_port = if url.scheme() == "https" { 443 } else { 80 };
        Ok(Self {
            host,
            port,
            scheme_port,
        })
    }

    /// Whether a request's `Origin` header is this origin (scheme, host and port).
    pub fn matches_origin(&self, header: &str) -> bool {
        Self::parse(header).is_ok_and(|other| other == *self)
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

/// `server.sessionLimits`: what one session may send through its worker, checked by the
/// supervisor on every event (a worker runs the session's commands and is not trusted). Past a
/// limit the run ends with an error naming it and the worker is stopped.
///
/// The defaults leave room for everything a legitimate session does: a model streams at most
/// a few thousand tokens a second and the echo model's `FLOOD` benchmark a few hundred
/// thousand events in one burst; one event can carry a 20 MiB query or a 4 MiB file echoed
/// (JSON-escaped) in a tool call, and no event can exceed the 32 MiB frame anyway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionLimits {
    /// Events a session's worker may send per second, sustained; bursts of up to one second's
    /// worth pass.
    #[serde(default = "default_events_per_second")]
    pub events_per_second: u64,
    /// The largest single event (its JSON), streaming deltas included.
    #[serde(default = "default_event_bytes")]
    pub event_bytes: ByteSize,
    /// The bytes of stored events one session may hold; past it its runs are refused.
    #[serde(default = "default_stored_bytes")]
    pub stored_bytes: ByteSize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            events_per_second: default_events_per_second(),
            event_bytes: default_event_bytes(),
            stored_bytes: default_stored_bytes(),
        }
    }
}

fn default_events_per_second() -> u64 {
    250_000
}
fn default_event_bytes() -> ByteSize {
    ByteSize(shared::frame::MAX_FRAME_LEN as u64)
}
fn default_stored_bytes() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}

/// `server.http`: connection timeouts. Neither touches a request in progress: an SSE stream,
/// a long poll or a WebSocket stays open however quiet it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpTimeouts {
    /// A connection must deliver a whole request head within this many seconds of its first
    /// byte (or of being opened), or it is closed: a half-sent request holds nothing for long.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    /// A connection with no request in progress is closed after this many idle seconds.
    #[serde(default = "default_http_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// A request's body must have arrived whole within this many seconds of its head, or the
    /// request fails (408): a body sent a byte at a time holds nothing for long either.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_secs: u64,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header_read_timeout_secs: default_header_read_timeout(),
            idle_timeout_secs: default_http_idle_timeout(),
            body_read_timeout_secs: default_body_read_timeout(),
        }
    }
}

fn default_header_read_timeout() -> u64 {
    20
}
fn default_body_read_timeout() -> u64 {
    60
}
fn default_http_idle_timeout() -> u64 {
    75
}

/// `server.dataDir` when nothing sets it.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

/// The control socket inside a data directory.
pub fn control_socket_in(data_dir: &Path) -> PathBuf {
    data_dir.join("ctl.sock")
}

/// Where `supervisor ctl` looks for the server: `--socket`, else the socket in `--data-dir`,
/// else in `DATA_DIR`, else in the default data directory, as the server decides it.
pub fn ctl_socket(
    socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    env: impl Fn(&str) -> Option<String>,
) -> PathBuf {
    socket.unwrap_or_else(|| {
        let dir = data_dir
            .or_else(|| env("DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(default_data_dir);
        control_socket_in(&dir)
    })
}

impl ServerConfig {
    /// The control socket: `server.controlSocket`, or `ctl.sock` in the data directory.
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| control_socket_in(&self.data_dir))
    }

    /// Where the `file` or `sqlite` backend keeps its data.
    pub fn storage_path(&self) -> PathBuf {
        self.storage.resolved_path(&self.data_dir)
    }

    /// The directory each strict jail mounts its new root on (it must be the server's own).
    pub fn jail_stage(&self) -> PathBuf {
        self.data_dir.join("jail-stage")
    }
}

/// Worker lifecycle under load (`server.workers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
            data_dir: default_data_dir(),
            control_socket: None,
            runtime_settings: None,
            session_limits: SessionLimits::default(),
            http: HttpTimeouts::default(),
            workspace_origin: None,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            allow_unauthenticated: false,
        }
    }
}

/// `server.runtimeSettings`: the JSON-Schema-like description of the settings a session may
/// carry. Upstream also takes a `transform` function, which a declarative config cannot hold:
/// settings are stored and shown, and reach no agent option.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    #[serde(default)]
    pub provider: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(rename = "type", default)]
    pub kind: StorageKind,
    /// The file or directory of the `file` and `sqlite` backends.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The database of the `postgres` backend (`STORAGE_URL`), e.g.
    /// `postgres://agentd:secret@db.internal/agentd`.
    #[serde(default)]
    pub url: Option<StorageUrl>,
}

/// A database URL, which may carry a password: it is never printed as it is. Its `Debug` shows
/// nothing of it; logs and health show the storage's redacted form.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StorageUrl(String);

impl StorageUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, password included: for connecting, never for showing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for StorageUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageUrl(<redacted>)")
    }
}

impl StorageConfig {
    /// Where the backend keeps its data: the configured path, or `sessions` (a directory, for
    /// `file`) or `sessions.db` (for `sqlite`) in the data directory.
    pub fn resolved_path(&self, data_dir: &Path) -> PathBuf {
        match (&self.path, self.kind) {
            (Some(path), _) => path.clone(),
            (None, StorageKind::Sqlite) => data_dir.join("sessions.db"),
            (None, _) => data_dir.join("sessions"),
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
    Postgres,
}

/// One model as configured (`model`, each of `server.models[]`): upstream's `AgentModel` plus
/// our per-model settings (agent.md §4.7). Only `provider`, `id` and `displayName` are ever shown.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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

/// Values given on the command line; `None` (or `false`) means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub workspace: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub storage_type: Option<String>,
    pub storage_path: Option<PathBuf>,
    pub exclusive: bool,
    pub model_provider: Option<String>,
    pub model_id: Option<String>,
    pub log_level: Option<String>,
    /// `webui.staticPath`: serve this UI directory (the official UI's `static/`) instead of the
    /// built-in one.
    pub webui_static_path: Option<PathBuf>,
    /// `isolation.level` (`--isolation`).
    pub isolation: Option<String>,
    /// `isolation.allowInsecure` (`--allow-insecure-isolation`).
    pub allow_insecure_isolation: bool,
    /// `isolation.allowInsecureRemote` (`--allow-insecure-remote`).
    pub allow_insecure_remote: bool,
    /// `server.allowUnauthenticated` (`--allow-unauthenticated`).
    pub allow_unauthenticated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("config file {path} has an unknown extension; use .toml, .yaml, .yml or .json")]
    UnknownFormat { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration: {0}")]
    Isolation(#[from] crate::isolation::InvalidIsolation),
    #[error("invalid configuration: unknown key `{key}`{}", suggestion_text(.suggestion, .known))]
    UnknownKey {
        key: String,
        /// The known key closest to the misspelt one, if any is close.
        suggestion: Option<String>,
        /// The keys the section does know.
        known: Vec<String>,
    },
    #[error("invalid environment variable {name}={value:?}: {problem}")]
    Env {
        name: &'static str,
        value: String,
        problem: String,
    },
    #[error("invalid {flag} {value:?}: {problem}")]
    Flag {
        flag: &'static str,
        value: String,
        problem: String,
    },
}

fn suggestion_text(suggestion: &Option<String>, known: &[String]) -> String {
    match suggestion {
        Some(near) => format!(" (did you mean `{near}`?)"),
        None if known.is_empty() => String::new(),
        None => format!(" (known keys here: {})", known.join(", ")),
    }
}

/// Reads the configuration from `file` (if any), the process environment and `flags`.
///
/// # Errors
/// A missing or unparsable file, or any value of the wrong type or out of range, naming the key.
pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Config, ConfigError> {
    load_with_env(file, flags, |name| std::env::var(name).ok())
}

/// [`load`] with the environment injected, so tests need not touch the process environment.
///
/// This is the one place where the sources are layered: the file, then the environment
/// (the seed's variables, `DATA_DIR` and the `AGENTD_*` isolation switches), then the flags,
/// each later source winning (ARCHITECTURE decision 10).
pub fn load_with_env(
    file: Option<&Path>,
    flags: &Overrides,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        figment = figment.merge(file_source(path)?);
        // The file is checked on its own first: a later layer can hide a mistake in it (the
        // flags' `server.port` would replace a scalar `server` without a word).
        figment.extract::<Config>().map_err(describe)?;
    }
    figment = figment.merge(Serialized::defaults(env_layer(&env)?));
    figment = figment.merge(Serialized::defaults(flag_layer(flags)?));
    let mut config: Config = figment.extract().map_err(describe)?;
    validate(&config)?;
    crate::isolation::validate(&config.isolation)?;
    config.catalogue = catalogue::resolve(&config, &env)?;
    config.tenant_limits = tenants::resolve(&config.tenants, &config.catalogue, &env)?;
    Ok(config)
}

/// The file as a figment source, by its extension.
fn file_source(path: &Path) -> Result<Figment, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::MissingFile {
            path: path.to_owned(),
        });
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let figment = Figment::new();
    Ok(match ext.as_deref() {
        Some("toml") => figment.merge(Toml::file_exact(path)),
        Some("yaml" | "yml") => figment.merge(Yaml::file_exact(path)),
        Some("json") => figment.merge(Json::file_exact(path)),
        _ => {
            return Err(ConfigError::UnknownFormat {
                path: path.to_owned(),
            });
        }
    })
}

/// A figment error as our users should read it: an unknown key with its full path and the
/// nearest known one; otherwise figment's message, whose `default.` profile prefix means
/// nothing to them and is dropped.
fn describe(error: figment::Error) -> ConfigError {
    if let figment::error::Kind::UnknownField(field, expected) = &error.kind {
        // figment's path ends with the unknown key itself.
        let mut path: Vec<&str> = error.path.iter().map(String::as_str).collect();
        if path.last() != Some(&field.as_str()) {
            path.push(field);
        }
        return ConfigError::UnknownKey {
            key: path.join("."),
            suggestion: nearest(field, expected).map(str::to_owned),
            known: expected.iter().map(|k| (*k).to_owned()).collect(),
        };
    }
    ConfigError::Invalid(
        error
            .into_iter()
            .map(|e| e.to_string().replace("key \"default.", "key \""))
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// The known key a misspelt one most likely meant: the same letters in another case or
/// spelling (`max_iterations`), one within a couple of edits (`prot`, `storge`), or one it
/// begins (`idleTimeout`).
fn nearest<'a>(typed: &str, known: &[&'a str]) -> Option<&'a str> {
    let fold = |k: &str| k.replace(['_', '-'], "").to_ascii_lowercase();
    let typed_folded = fold(typed);
    if let Some(same) = known.iter().find(|k| fold(k) == typed_folded) {
        return Some(same);
    }
    let budget = (typed.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&typed_folded, &fold(k)), *k))
        .filter(|(distance, _)| *distance <= budget)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
        // A key with its unit left off (`idleTimeout` for `idleTimeoutSecs`).
        .or_else(|| {
            known
                .iter()
                .find(|k| typed_folded.len() >= 4 && fold(k).starts_with(&typed_folded))
                .copied()
        })
}

fn validate(config: &Config) -> Result<(), ConfigError> {
    if let Some(agent) = config.agent.as_deref()
        && agent != BUILTIN_AGENT
    {
        return Err(ConfigError::Invalid(format!(
            "agent {agent:?} is not available: this server runs its built-in agent only; leave \
             `agent` out or set it to \"{BUILTIN_AGENT}\""
        )));
    }
    if config.server.data_dir.as_os_str().is_empty() {
        return Err(ConfigError::Invalid(
            "server.dataDir must not be empty".into(),
        ));
    }
    if config.server.host.trim().is_empty() {
        return Err(ConfigError::Invalid("server.host must not be empty".into()));
    }
    if config.server.workers.max == 0 {
        return Err(ConfigError::Invalid(
            "server.workers.max must be at least 1".into(),
        ));
    }
    validate_session_limits(&config.server.session_limits)?;
    let http = &config.server.http;
    if http.header_read_timeout_secs == 0 || http.idle_timeout_secs == 0 {
        return Err(ConfigError::Invalid(
            "server.http.headerReadTimeoutSecs and server.http.idleTimeoutSecs must be at least 1"
                .into(),
        ));
    }
    if config.max_iterations == 0 {
        return Err(ConfigError::Invalid(
            "maxIterations must be at least 1".into(),
        ));
    }
    let storage = &config.server.storage;
    match (storage.kind, &storage.url, &storage.path) {
        (StorageKind::Postgres, None, _) => {
            return Err(ConfigError::Invalid(
                "server.storage.type postgres needs server.storage.url (or STORAGE_URL), e.g. \
                 postgres://agentd:secret@db.internal/agentd"
                    .into(),
            ));
        }
        (StorageKind::Postgres, _, Some(_)) => {
            return Err(ConfigError::Invalid(
                "server.storage.path is for the file and sqlite backends; postgres takes \
                 server.storage.url"
                    .into(),
            ));
        }
        (StorageKind::Memory | StorageKind::File | StorageKind::Sqlite, Some(_), _) => {
            return Err(ConfigError::Invalid(
                "server.storage.url is for the postgres backend; set server.storage.type to \
                 postgres or leave the url out"
                    .into(),
            ));
        }
        _ => {}
    }
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
    for origin in &config.server.allowed_origins {
        if let Err(reason) = WorkspaceOrigin::parse(origin) {
            return Err(ConfigError::Invalid(format!(
                "server.allowedOrigins must hold http(s) origins like \"https://app.example.com\", \
                 got {origin:?}: {reason}"
            )));
        }
    }
    if let Some(auth) = &config.auth {
        auth.validate().map_err(ConfigError::Invalid)?;
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

/// Limits low enough to stop ordinary runs are refused at start rather than discovered later:
/// every run sends a few events of a few hundred bytes each.
fn validate_session_limits(limits: &SessionLimits) -> Result<(), ConfigError> {
    const MIN_EVENT_BYTES: u64 = 4 * 1024;
    const MIN_STORED_BYTES: u64 = 16 * 1024;
    if limits.events_per_second < 10 {
        return Err(ConfigError::Invalid(
            "server.sessionLimits.eventsPerSecond must be at least 10".into(),
        ));
    }
    if limits.event_bytes.0 < MIN_EVENT_BYTES {
        return Err(ConfigError::Invalid(format!(
            "server.sessionLimits.eventBytes must be at least {MIN_EVENT_BYTES} bytes"
        )));
    }
    if limits.stored_bytes.0 < MIN_STORED_BYTES {
        return Err(ConfigError::Invalid(format!(
            "server.sessionLimits.storedBytes must be at least {MIN_STORED_BYTES} bytes"
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

/// The one agent this server has; the seed's `agent` key may name it.
pub const BUILTIN_AGENT: &str = "builtin";

/// `1`, `true`, `yes` or `on`: an environment switch that is set.
fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// The isolation level a variable or flag names, as the config file spells it.
fn isolation_level(text: &str) -> Option<&'static str> {
    crate::isolation::RequestedLevel::parse(text).map(|level| level.as_str())
}

const LEVELS: &str = "use auto, strict, chroot or none";

/// The environment's settings, as a partial config tree: the seed's variables, `DATA_DIR`, and
/// the isolation switches.
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
    if let Some(dir) = env("DATA_DIR") {
        layer["server"]["dataDir"] = json!(dir);
    }
    if let Some(kind) = env("STORAGE_TYPE") {
        let kind = kind.trim().to_ascii_lowercase();
        if !matches!(kind.as_str(), "memory" | "file" | "sqlite" | "postgres") {
            return Err(ConfigError::Env {
                name: "STORAGE_TYPE",
                value: kind,
                problem: "server.storage.type must be memory, file, sqlite or postgres".into(),
            });
        }
        layer["server"]["storage"]["type"] = json!(kind);
    }
    if let Some(path) = env("STORAGE_PATH") {
        layer["server"]["storage"]["path"] = json!(path);
    }
    // No flag sets the URL: it may carry a password, which would show in the process list.
    if let Some(url) = env("STORAGE_URL") {
        layer["server"]["storage"]["url"] = json!(url);
    }
    if let Some(provider) = env("MODEL_PROVIDER") {
        layer["model"]["provider"] = json!(provider);
    }
    if let Some(id) = env("MODEL_ID") {
        layer["model"]["id"] = json!(id);
    }
    if let Some(level) = env("AGENTD_ISOLATION") {
        layer["isolation"]["level"] = json!(isolation_level(&level).ok_or_else(|| {
            ConfigError::Env {
                name: "AGENTD_ISOLATION",
                value: level.clone(),
                problem: LEVELS.into(),
            }
        })?);
    }
    if env("AGENTD_ALLOW_INSECURE").is_some_and(|v| truthy(&v)) {
        layer["isolation"]["allowInsecure"] = json!(true);
    }
    if env("AGENTD_ALLOW_INSECURE_REMOTE").is_some_and(|v| truthy(&v)) {
        layer["isolation"]["allowInsecureRemote"] = json!(true);
    }
    Ok(layer)
}

fn flag_layer(flags: &Overrides) -> Result<Value, ConfigError> {
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
    if let Some(dir) = &flags.data_dir {
        layer["server"]["dataDir"] = json!(dir);
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
    if let Some(level) = &flags.isolation {
        layer["isolation"]["level"] =
            json!(isolation_level(level).ok_or_else(|| ConfigError::Flag {
                flag: "--isolation",
                value: level.clone(),
                problem: LEVELS.into(),
            })?);
    }
    if flags.allow_insecure_isolation {
        layer["isolation"]["allowInsecure"] = json!(true);
    }
    if flags.allow_insecure_remote {
        layer["isolation"]["allowInsecureRemote"] = json!(true);
    }
    if flags.allow_unauthenticated {
        layer["server"]["allowUnauthenticated"] = json!(true);
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::RequestedLevel;
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
    fn session_limits_and_http_timeouts_are_read_and_checked() {
        let c = load_with_env(None, &Overrides::default(), |_| None).unwrap();
        let limits = &c.server.session_limits;
        assert_eq!(limits.events_per_second, 250_000);
        assert_eq!(limits.event_bytes.0, 32 * 1024 * 1024);
        assert_eq!(limits.stored_bytes.0, 256 * 1024 * 1024);
        assert_eq!(c.server.http.header_read_timeout_secs, 20);
        assert_eq!(c.server.http.idle_timeout_secs, 75);

        let toml = "[server.sessionLimits]\neventsPerSecond = 100\neventBytes = \"16KiB\"\nstoredBytes = \"1MiB\"\n[server.http]\nheaderReadTimeoutSecs = 5\nidleTimeoutSecs = 30\n";
        let c = load_str("toml", toml, &[], &Overrides::default()).unwrap();
        let limits = &c.server.session_limits;
        assert_eq!(limits.events_per_second, 100);
        assert_eq!(limits.event_bytes.0, 16 * 1024);
        assert_eq!(limits.stored_bytes.0, 1024 * 1024);
        assert_eq!(c.server.http.header_read_timeout_secs, 5);
        assert_eq!(c.server.http.idle_timeout_secs, 30);

        for (bad, key) in [
            (
                "[server.sessionLimits]\neventsPerSecond = 0\n",
                "eventsPerSecond",
            ),
            ("[server.sessionLimits]\neventBytes = 100\n", "eventBytes"),
            (
                "[server.sessionLimits]\nstoredBytes = \"1k\"\n",
                "storedBytes",
            ),
            (
                "[server.sessionLimits]\neventBytes = \"lots\"\n",
                "eventBytes",
            ),
            (
                "[server.http]\nheaderReadTimeoutSecs = 0\n",
                "headerReadTimeoutSecs",
            ),
            ("[server.http]\nidleTimeoutSecs = 0\n", "idleTimeoutSecs"),
        ] {
            let err = load_str("toml", bad, &[], &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
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

    /// One typo per section, the seed's appConfig shape included: each is refused, naming the
    /// key's full path and the key that was meant.
    #[test]
    fn a_typo_in_any_section_is_refused() {
        let cases = [
            ("agnt = \"builtin\"\n", "agnt", Some("agent")),
            ("workspce = \"/w\"\n", "workspce", Some("workspace")),
            ("maxIteration = 3\n", "maxIteration", Some("maxIterations")),
            ("log_level = \"info\"\n", "log_level", Some("logLevel")),
            ("[server]\nprot = 3000\n", "server.prot", Some("port")),
            (
                "[server]\ndatadir = \"/d\"\n",
                "server.datadir",
                Some("dataDir"),
            ),
            (
                "[server.storage]\ntyp = \"file\"\n",
                "server.storage.typ",
                Some("type"),
            ),
            (
                "[server.http]\nidleTimeout = 3\n",
                "server.http.idleTimeout",
                Some("idleTimeoutSecs"),
            ),
            (
                "[server.sessionLimits]\neventPerSecond = 3\n",
                "server.sessionLimits.eventPerSecond",
                Some("eventsPerSecond"),
            ),
            (
                "[server.workers]\nmaxx = 3\n",
                "server.workers.maxx",
                Some("max"),
            ),
            (
                "[server.runtimeSettings]\nschem = {}\n",
                "server.runtimeSettings.schem",
                Some("schema"),
            ),
            (
                "[[server.models]]\nidd = \"x\"\n",
                "server.models.0.idd",
                Some("id"),
            ),
            (
                "[model]\nprovder = \"openai\"\n",
                "model.provder",
                Some("provider"),
            ),
            (
                "[model]\nbaseurl = \"http://x\"\n",
                "model.baseurl",
                Some("baseURL"),
            ),
            (
                "[[model.providers]]\nname = \"openai\"\nmodles = []\n",
                "model.providers.0.modles",
                Some("models"),
            ),
            (
                "[model.timeouts]\nidelMs = 5\n",
                "model.timeouts.idelMs",
                Some("idleMs"),
            ),
            (
                "[gateway]\nmaxAtempts = 2\n",
                "gateway.maxAtempts",
                Some("maxAttempts"),
            ),
            (
                "[gateway.timeouts]\nconectMs = 2\n",
                "gateway.timeouts.conectMs",
                Some("connectMs"),
            ),
            (
                "[agio]\nprovder = \"http://a\"\n",
                "agio.provder",
                Some("provider"),
            ),
            (
                "[share]\nprovder = \"http://s\"\n",
                "share.provder",
                Some("provider"),
            ),
            (
                "[isolation]\nlevl = \"auto\"\n",
                "isolation.levl",
                Some("level"),
            ),
            (
                "[isolation.limits]\nmemroy = \"1GiB\"\n",
                "isolation.limits.memroy",
                Some("memory"),
            ),
            ("[isolation]\nsandbox = true\n", "isolation.sandbox", None),
        ];
        for (text, key, meant) in cases {
            let err = load_str("toml", text, &[], &Overrides::default()).unwrap_err();
            match &err {
                ConfigError::UnknownKey {
                    key: k, suggestion, ..
                } => {
                    assert_eq!(k, key, "{text}");
                    assert_eq!(suggestion.as_deref(), meant, "{text}");
                }
                other => panic!("{text}: {other}"),
            }
            let message = err.to_string();
            assert!(message.contains(&format!("`{key}`")), "{message}");
            if let Some(meant) = meant {
                assert!(
                    message.contains(&format!("did you mean `{meant}`?")),
                    "{message}"
                );
            } else {
                assert!(message.contains("known keys here: level,"), "{message}");
            }
        }
    }

    #[test]
    fn a_wrong_type_is_refused_even_where_a_flag_sets_the_section() {
        let flags = Overrides {
            port: Some(0),
            ..Overrides::default()
        };
        let err = load_str("toml", "server = 5\n", &[], &flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("key \"server\""), "{err}");
        let err = load_str(
            "json",
            r#"{"model": "gpt-4o"}"#,
            &[("MODEL_ID", "x")],
            &flags,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key \"model\""), "{err}");
    }

    /// The objects that are open by design take any key.
    #[test]
    fn open_objects_stay_open() {
        let text = r#"{
            "webui": {"title": "T", "welcomTitle": "W", "layout": {"x": 1}},
            "model": {"provider": "openai", "id": "gpt-4o", "apiKey": "k",
                      "headers": {"X-Title": "t"}, "params": {"top_p": 0.5, "any": [1]},
                      "thinking": {"type": "enabled", "budgetTokens": 1024}},
            "server": {"runtimeSettings": {"schema": {"type": "object", "whatever": true}}}
        }"#;
        let c = load_str("json", text, &[], &Overrides::default()).unwrap();
        assert_eq!(c.webui.unwrap().0["welcomTitle"], "W");
    }

    /// The seed's `appConfig` example, as written there (with our built-in agent named).
    #[test]
    fn the_seed_app_config_is_accepted() {
        let text = r#"{
            "agent": "builtin",
            "workspace": "./workspace",
            "server": {"port": 3000, "exclusive": false,
                       "storage": {"type": "sqlite", "path": "./sessions.db"}},
            "model": {"provider": "openai", "id": "gpt-4", "apiKey": "k",
                      "providers": [{"name": "openai", "models": ["gpt-4", "gpt-3.5-turbo"],
                                     "baseURL": "https://api.openai.com/v1"}]},
            "agio": {"provider": "https://agio.example.com/api/events"},
            "share": {"provider": "https://share.example.com/api/upload"},
            "logLevel": "debug"
        }"#;
        let c = load_str("json", text, &[], &Overrides::default()).unwrap();
        assert_eq!(c.agent.as_deref(), Some(BUILTIN_AGENT));
        assert_eq!(c.server.storage.kind, StorageKind::Sqlite);
    }

    #[test]
    fn only_the_builtin_agent_is_accepted() {
        assert!(
            load_str("toml", "", &[], &Overrides::default())
                .unwrap()
                .agent
                .is_none()
        );
        let err = load_str(
            "json",
            r#"{"agent": "my-agent"}"#,
            &[],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("agent \"my-agent\"") && err.contains("built-in agent"),
            "{err}"
        );
        let err = load_str(
            "json",
            r#"{"agent": {"name": "x"}}"#,
            &[],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key \"agent\""), "{err}");
    }

    /// The isolation switches are layered with the rest: file < `AGENTD_*` < flags.
    #[test]
    fn isolation_overrides_env_then_flags() {
        let file = "[isolation]\nlevel = \"strict\"\n";
        let c = load_str("toml", file, &[], &Overrides::default()).unwrap();
        assert_eq!(c.isolation.level, RequestedLevel::Strict);
        let env = [
            ("AGENTD_ISOLATION", "Chroot"),
            ("AGENTD_ALLOW_INSECURE", "1"),
        ];
        let c = load_str("toml", file, &env, &Overrides::default()).unwrap();
        assert_eq!(c.isolation.level, RequestedLevel::Chroot);
        assert!(c.isolation.allow_insecure && !c.isolation.allow_insecure_remote);
        let flags = Overrides {
            isolation: Some("none".into()),
            allow_insecure_remote: true,
            ..Overrides::default()
        };
        let c = load_str("toml", file, &env, &flags).unwrap();
        assert_eq!(c.isolation.level, RequestedLevel::None);
        assert!(c.isolation.allow_insecure && c.isolation.allow_insecure_remote);
        let c = load_str(
            "toml",
            file,
            &[("AGENTD_ALLOW_INSECURE", "0")],
            &Overrides::default(),
        )
        .unwrap();
        assert!(!c.isolation.allow_insecure);

        let bad = Overrides {
            isolation: Some("sandboxed".into()),
            ..Overrides::default()
        };
        let err = load_str("toml", "", &[], &bad).unwrap_err().to_string();
        assert!(
            err.contains("--isolation") && err.contains("sandboxed"),
            "{err}"
        );
        let err = load_str(
            "toml",
            "",
            &[("AGENTD_ISOLATION", "jail")],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("AGENTD_ISOLATION"), "{err}");
        let err = load_str(
            "toml",
            "[isolation]\nuidCount = 1\n",
            &[],
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("isolation.uidCount"), "{err}");
    }

    /// The postgres backend takes its URL from the file or `STORAGE_URL` (no flag), needs one,
    /// and refuses the other backend's key; the URL's password never shows in `Debug`.
    #[test]
    fn postgres_storage_takes_a_url() {
        let url = "postgres://agentd:hunter2@db.internal:5432/agentd";
        let file = format!("[server.storage]\ntype = \"postgres\"\nurl = \"{url}\"\n");
        let c = load_str("toml", &file, &[], &Overrides::default()).unwrap();
        assert_eq!(c.server.storage.kind, StorageKind::Postgres);
        assert_eq!(c.server.storage.url.as_ref().unwrap().expose(), url);
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "Debug shows the password"
        );

        let env = [("STORAGE_TYPE", "Postgres"), ("STORAGE_URL", url)];
        let c = load_str("toml", "", &env, &Overrides::default()).unwrap();
        assert_eq!(c.server.storage.kind, StorageKind::Postgres);
        assert_eq!(c.server.storage.url.unwrap().expose(), url);
        let flags = Overrides {
            storage_type: Some("postgres".into()),
            ..Overrides::default()
        };
        let c = load_str("toml", "", &[("STORAGE_URL", url)], &flags).unwrap();
        assert_eq!(c.server.storage.kind, StorageKind::Postgres);

        let refused = |text: &str, env: &[(&str, &str)]| {
            load_str("toml", text, env, &Overrides::default())
                .unwrap_err()
                .to_string()
        };
        let err = refused("[server.storage]\ntype = \"postgres\"\n", &[]);
        assert!(err.contains("server.storage.url"), "{err}");
        let err = refused("", &[("STORAGE_TYPE", "sqlite"), ("STORAGE_URL", url)]);
        assert!(
            err.contains("server.storage.url is for the postgres"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let err = refused(&format!("{file}path = \"/p\"\n"), &[]);
        assert!(err.contains("server.storage.path"), "{err}");
        let err = refused("[server.storage]\ntype = \"postgres\"\nuri = \"x\"\n", &[]);
        assert!(
            err.contains("server.storage.uri") && err.contains("`url`"),
            "{err}"
        );
    }

    /// The data directory holds the control socket and the default stores, from the file,
    /// `DATA_DIR` or `--data-dir`; explicit paths still win.
    #[test]
    fn the_data_directory_holds_the_defaults() {
        let c = load_with_env(None, &Overrides::default(), |_| None).unwrap();
        assert_eq!(c.server.data_dir, PathBuf::from("./data"));
        assert_eq!(c.server.control_socket(), PathBuf::from("./data/ctl.sock"));
        let file = "[server]\ndataDir = \"/f\"\n[server.storage]\ntype = \"sqlite\"\n";
        let c = load_str("toml", file, &[], &Overrides::default()).unwrap();
        assert_eq!(c.server.storage_path(), PathBuf::from("/f/sessions.db"));
        assert_eq!(c.server.jail_stage(), PathBuf::from("/f/jail-stage"));
        let c = load_str("toml", file, &[("DATA_DIR", "/e")], &Overrides::default()).unwrap();
        assert_eq!(c.server.control_socket(), PathBuf::from("/e/ctl.sock"));
        let flags = Overrides {
            data_dir: Some("/g".into()),
            storage_type: Some("file".into()),
            ..Overrides::default()
        };
        let c = load_str("toml", file, &[("DATA_DIR", "/e")], &flags).unwrap();
        assert_eq!(c.server.storage_path(), PathBuf::from("/g/sessions"));
        let explicit = "[server]\ndataDir = \"/f\"\ncontrolSocket = \"/s/c.sock\"\n\
                        [server.storage]\ntype = \"file\"\npath = \"/p\"\n";
        let c = load_str("toml", explicit, &[], &Overrides::default()).unwrap();
        assert_eq!(c.server.control_socket(), PathBuf::from("/s/c.sock"));
        assert_eq!(c.server.storage_path(), PathBuf::from("/p"));

        let env = |k: &str| (k == "DATA_DIR").then(|| "/e".to_owned());
        assert_eq!(ctl_socket(None, None, env), PathBuf::from("/e/ctl.sock"));
        assert_eq!(
            ctl_socket(None, Some("/d".into()), env),
            PathBuf::from("/d/ctl.sock")
        );
        assert_eq!(
            ctl_socket(Some("/x.sock".into()), Some("/d".into()), env),
            PathBuf::from("/x.sock")
        );
        assert_eq!(
            ctl_socket(None, None, |_| None),
            PathBuf::from("./data/ctl.sock")
        );
    }

    #[test]
    fn nearest_key() {
        let known = ["host", "port", "exclusive", "storage", "dataDir"];
        assert_eq!(nearest("prot", &known), Some("port"));
        assert_eq!(nearest("data_dir", &known), Some("dataDir"));
        assert_eq!(nearest("Host", &known), Some("host"));
        assert_eq!(nearest("colour", &known), None);
        assert_eq!(
            nearest("idleTimeout", &["idleTimeoutSecs", "max"]),
            Some("idleTimeoutSecs")
        );
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

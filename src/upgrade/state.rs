//! What a client session carries from the old process to the new one, and its wire
//! format: small, explicit, versioned, and read as untrusted input (a bad record is an
//! error, never a panic, and nothing in it is allocated beyond [`MAX_STATE`]).
//!
//! ```text
//! "PGMUXS" | version u16 | database, user, application_name | cancel pid i32, secret i32
//! | wants: u32 n × (name, kind u8 [0 text, 1 sql], value)
//! | greeted: u32 n × (name, value) | seen: u32 n × (name, value)
//! | statements: u32 n × (name, query, u16 n × type oid u32)
//! | channels: u32 n × name                       (version 2 and later)
//! version 3 only, then: the server connection the client holds (its socket travels in the
//! same record as the client's, SCM_RIGHTS):
//! | address kind u8 [0 tcp, 1 unix], address | backend pid i32, secret i32
//! | hold u8 [0 session mode, 1 pinned] | pin kinds (`temp_table,advisory_lock`)
//! | age ms u64 | retires in ms u64 (u64::MAX: never)
//! | reported: u32 n × (name, value) | initial: u32 n × (name, value)
//! | applied: u32 n × (name, kind u8, value)
//! | prepared: u32 n × (server name, query, u16 n × type oid u32)
//! | prepared unsure u8 [0, 1]: it may hold statements not listed
//! ```
//! Strings are u32 length + UTF-8 bytes without NUL; integers big-endian. A session with no
//! server is written as version 2, which the pgmux before version 3 reads too; version 1
//! (an older pgmux's, without the channels) is read too.

use std::net::SocketAddr;

use crate::client::state::Kinds;
use crate::notify::HandoverPlan;
use crate::server::SettingValue;

/// The largest serialized session accepted (bytes). A session whose state is larger (a
/// client with very many or very long prepared statements) is closed instead of moved.
pub const MAX_STATE: usize = 16 * 1024 * 1024;
const MAGIC: &[u8; 6] = b"PGMUXS";
/// The newest format version this build writes and reads (it reads versions 1 and 2 too,
/// and writes version 2 for a client that holds no server).
pub const VERSION: u16 = 3;
/// The version without a server connection (with the channels).
const VERSION_NO_SERVER: u16 = 2;

/// One client's session, as the new process needs it to go on serving it with no new
/// login and no greeting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionState {
    /// The database the client logged in to (pgmux's name for it).
    pub database: String,
    /// The user it logged in as.
    pub user: String,
    /// Its application_name, for the admin views.
    pub application_name: String,
    /// The cancel key it was given at login: (process id, secret).
    pub cancel_key: (i32, i32),
    /// The settings it wants on its server: (name as written, value).
    pub wants: Vec<(String, SettingValue)>,
    /// The ParameterStatus set it was greeted with.
    pub greeted: Vec<(String, String)>,
    /// ParameterStatus values reported to it since, where they differ.
    pub seen: Vec<(String, String)>,
    /// Its named prepared statements.
    pub statements: Vec<PreparedState>,
    /// The channels it LISTENs to (the new process has subscribed it already).
    pub channels: Vec<String>,
    /// The server connection it keeps between transactions (session mode, or pinned by
    /// session state), which moves with it.
    pub server: Option<ServerState>,
}

/// A server connection that moves with its client: what the new process needs to go on
/// using it as if it had opened it. Its socket travels beside the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerState {
    /// Where it is connected.
    pub addr: CarriedAddr,
    /// PostgreSQL's key for it: (backend process id, secret).
    pub backend_key: (i32, i32),
    /// Why the client keeps it.
    pub hold: Hold,
    /// How long ago it was opened (milliseconds).
    pub age_ms: u64,
    /// When it retires (max_lifetime), in milliseconds from now; `None`: never.
    pub retire_in_ms: Option<u64>,
    /// ParameterStatus values it reported, in the order first seen.
    pub params: Vec<(String, String)>,
    /// Its ParameterStatus values right after login.
    pub initial_params: Vec<(String, String)>,
    /// Settings clients applied to it that it does not report, by lowercase name.
    pub applied: Vec<(String, SettingValue)>,
    /// The named statements pgmux prepared on it.
    pub prepared: Vec<PreparedState>,
    /// It may hold statements of pgmux's that are not listed (its record was unsure:
    /// [`crate::prepared::ServerStatements`]).
    pub prepared_unsure: bool,
}

/// A server's address as carried: its socket is checked against it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CarriedAddr {
    Tcp(SocketAddr),
    /// The socket file's path.
    Unix(String),
}

/// Why a client keeps its server between transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Session mode: from login to the end.
    Session,
    /// Transaction or statement mode: session state pins it (never empty).
    Pinned(Kinds),
}

/// One named prepared statement of a client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreparedState {
    /// The client's name for it.
    pub name: String,
    /// Its query text.
    pub query: String,
    /// Its parameter type OIDs, as the client's Parse gave them.
    pub param_types: Vec<u32>,
}

/// Why a serialized session was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a pgmux session record")]
    Magic,
    #[error("session format version {0} (this pgmux reads version {VERSION})")]
    Version(u16),
    #[error("session record of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("session record ends early")]
    Truncated,
    #[error("session record has {0} bytes after its end")]
    Trailing(usize),
    #[error("session record holds a string that is not UTF-8 or has a NUL byte")]
    BadString,
    #[error("session record holds an unknown setting kind {0}")]
    BadKind(u8),
    #[error("session record holds an empty name")]
    EmptyName,
    #[error("session record holds an unknown server address kind {0}")]
    BadAddrKind(u8),
    #[error("session record holds a server address that does not read")]
    BadAddr,
    #[error("session record holds an unknown hold {0}")]
    BadHold(u8),
    #[error("session record holds pin kinds that do not read")]
    BadKinds,
    #[error("session record holds a flag {0} that is neither 0 nor 1")]
    BadFlag(u8),
}

impl SessionState {
    /// The record, or `TooLarge` when it would exceed [`MAX_STATE`].
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        let version = match self.server {
            Some(_) => VERSION,
            None => VERSION_NO_SERVER,
        };
        out.extend_from_slice(&version.to_be_bytes());
        for s in [&self.database, &self.user, &self.application_name] {
            put_str(&mut out, s);
        }
        out.extend_from_slice(&self.cancel_key.0.to_be_bytes());
        out.extend_from_slice(&self.cancel_key.1.to_be_bytes());
        put_settings(&mut out, &self.wants);
        put_pairs(&mut out, &self.greeted);
        put_pairs(&mut out, &self.seen);
        put_statements(&mut out, &self.statements)?;
        put_len(&mut out, self.channels.len());
        for channel in &self.channels {
            put_str(&mut out, channel);
        }
        if let Some(server) = &self.server {
            server.encode(&mut out)?;
        }
        if out.len() > MAX_STATE {
            return Err(StateError::TooLarge(out.len()));
        }
        Ok(out)
    }

    /// Reads a record written by [`SessionState::encode`]; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<SessionState, StateError> {
        if bytes.len() > MAX_STATE {
            return Err(StateError::TooLarge(bytes.len()));
        }
        let mut r = Reader(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(StateError::Magic);
        }
        let version = r.u16()?;
        if !(1..=VERSION).contains(&version) {
            return Err(StateError::Version(version));
        }
        let database = r.name()?;
        let user = r.name()?;
        let application_name = r.string()?;
        let cancel_key = (r.i32()?, r.i32()?);
        // Each element takes at least this many bytes: a count beyond what is left is a
        // lie, refused before anything is allocated for it.
        let wants = r.settings()?;
        let greeted = r.pairs()?;
        let seen = r.pairs()?;
        let statements = r.statements()?;
        let mut channels = Vec::new();
        if version >= 2 {
            let n = r.count(4)?;
            channels.reserve(n);
            for _ in 0..n {
                channels.push(r.name()?);
            }
        }
        let server = match version {
            VERSION => Some(ServerState::decode(&mut r)?),
            _ => None,
        };
        if !r.0.is_empty() {
            return Err(StateError::Trailing(r.0.len()));
        }
        Ok(SessionState {
            database,
            user,
            application_name,
            cancel_key,
            wants,
            greeted,
            seen,
            statements,
            channels,
            server,
        })
    }
}

/// The LISTEN hand-over plan of one database (`crate::notify::HandoverPlan`), as the old
/// process sends it: database, user, marker | u32 n × (pid i32, secret i32, u32 n ×
/// channel). Read as untrusted input, like a session.
pub fn encode_plan(plan: &HandoverPlan) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::new();
    for s in [&plan.database, &plan.user, &plan.marker] {
        put_str(&mut out, s);
    }
    put_len(&mut out, plan.clients.len());
    for ((pid, secret), channels) in &plan.clients {
        out.extend_from_slice(&pid.to_be_bytes());
        out.extend_from_slice(&secret.to_be_bytes());
        put_len(&mut out, channels.len());
        for channel in channels {
            put_str(&mut out, channel);
        }
    }
    if out.len() > MAX_STATE {
        return Err(StateError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Reads a record written by [`encode_plan`].
pub fn decode_plan(bytes: &[u8]) -> Result<HandoverPlan, StateError> {
    if bytes.len() > MAX_STATE {
        return Err(StateError::TooLarge(bytes.len()));
    }
    let mut r = Reader(bytes);
    let (database, user, marker) = (r.name()?, r.name()?, r.name()?);
    let n = r.count(4 + 4 + 4)?;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let key = (r.i32()?, r.i32()?);
        let m = r.count(4)?;
        let mut channels = Vec::with_capacity(m);
        for _ in 0..m {
            channels.push(r.name()?);
        }
        clients.push((key, channels));
    }
    if !r.0.is_empty() {
        return Err(StateError::Trailing(r.0.len()));
    }
    Ok(HandoverPlan {
        database,
        user,
        marker,
        clients,
    })
}

impl ServerState {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        match &self.addr {
            CarriedAddr::Tcp(addr) => {
                out.push(0);
                put_str(out, &addr.to_string());
            }
            CarriedAddr::Unix(path) => {
                out.push(1);
                put_str(out, path);
            }
        }
        out.extend_from_slice(&self.backend_key.0.to_be_bytes());
        out.extend_from_slice(&self.backend_key.1.to_be_bytes());
        match self.hold {
            Hold::Session => {
                out.push(0);
                put_str(out, "");
            }
            Hold::Pinned(kinds) => {
                out.push(1);
                put_str(out, &kinds.labels());
            }
        }
        out.extend_from_slice(&self.age_ms.to_be_bytes());
        let retire = self.retire_in_ms.unwrap_or(u64::MAX);
        out.extend_from_slice(&retire.to_be_bytes());
        put_pairs(out, &self.params);
        put_pairs(out, &self.initial_params);
        put_settings(out, &self.applied);
        put_statements(out, &self.prepared)?;
        out.push(u8::from(self.prepared_unsure));
        Ok(())
    }

    fn decode(r: &mut Reader<'_>) -> Result<ServerState, StateError> {
        let addr = match r.u8()? {
            0 => {
                let text = r.string()?;
                CarriedAddr::Tcp(text.parse().map_err(|_| StateError::BadAddr)?)
            }
            1 => CarriedAddr::Unix(r.name()?),
            other => return Err(StateError::BadAddrKind(other)),
        };
        let backend_key = (r.i32()?, r.i32()?);
        let hold = match r.u8()? {
            0 => {
                if !r.string()?.is_empty() {
                    return Err(StateError::BadKinds);
                }
                Hold::Session
            }
            1 => {
                let labels = r.string()?;
                match Kinds::from_labels(&labels) {
                    Some(kinds) if !kinds.is_empty() => Hold::Pinned(kinds),
                    _ => return Err(StateError::BadKinds),
                }
            }
            other => return Err(StateError::BadHold(other)),
        };
        let age_ms = r.u64()?;
        let retire_in_ms = Some(r.u64()?).filter(|&ms| ms != u64::MAX);
        Ok(ServerState {
            addr,
            backend_key,
            hold,
            age_ms,
            retire_in_ms,
            params: r.pairs()?,
            initial_params: r.pairs()?,
            applied: r.settings()?,
            prepared: r.statements()?,
            prepared_unsure: match r.u8()? {
                0 => false,
                1 => true,
                other => return Err(StateError::BadFlag(other)),
            },
        })
    }
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) {
    put_len(out, pairs.len());
    for (name, value) in pairs {
        put_str(out, name);
        put_str(out, value);
    }
}

fn put_settings(out: &mut Vec<u8>, settings: &[(String, SettingValue)]) {
    put_len(out, settings.len());
    for (name, value) in settings {
        put_str(out, name);
        let (kind, text) = match value {
            SettingValue::Text(t) => (0u8, t),
            SettingValue::Sql(s) => (1u8, s),
        };
        out.push(kind);
        put_str(out, text);
    }
}

fn put_statements(out: &mut Vec<u8>, statements: &[PreparedState]) -> Result<(), StateError> {
    put_len(out, statements.len());
    for s in statements {
        put_str(out, &s.name);
        put_str(out, &s.query);
        // A Parse carries at most i16::MAX types; more cannot have been accepted.
        let n = u16::try_from(s.param_types.len()).map_err(|_| StateError::TooLarge(0))?;
        out.extend_from_slice(&n.to_be_bytes());
        for oid in &s.param_types {
            out.extend_from_slice(&oid.to_be_bytes());
        }
    }
    Ok(())
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Over u32::MAX elements cannot fit MAX_STATE: encode then fails on the size.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over untrusted bytes: every read checks what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if n > self.0.len() {
            return Err(StateError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| StateError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, StateError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Settings: (name, kind u8, value) each.
    fn settings(&mut self) -> Result<Vec<(String, SettingValue)>, StateError> {
        // Each element takes at least this many bytes: a count beyond what is left is a
        // lie, refused before anything is allocated for it.
        let n = self.count(4 + 1 + 4)?;
        let mut settings = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.name()?;
            let value = match self.u8()? {
                0 => SettingValue::Text(self.string()?),
                1 => SettingValue::Sql(self.string()?),
                other => return Err(StateError::BadKind(other)),
            };
            settings.push((name, value));
        }
        Ok(settings)
    }

    /// (name, value) pairs.
    fn pairs(&mut self) -> Result<Vec<(String, String)>, StateError> {
        let n = self.count(4 + 4)?;
        let mut pairs = Vec::with_capacity(n);
        for _ in 0..n {
            pairs.push((self.name()?, self.string()?));
        }
        Ok(pairs)
    }

    /// Named statements: (name, query, types).
    fn statements(&mut self) -> Result<Vec<PreparedState>, StateError> {
        let n = self.count(4 + 4 + 2)?;
        let mut statements = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.name()?;
            let query = self.string()?;
            let types = usize::from(self.u16()?);
            if types * 4 > self.0.len() {
                return Err(StateError::Truncated);
            }
            let mut param_types = Vec::with_capacity(types);
            for _ in 0..types {
                param_types.push(self.u32()?);
            }
            statements.push(PreparedState {
                name,
                query,
                param_types,
            });
        }
        Ok(statements)
    }

    /// An element count, each element at least `min` bytes long.
    fn count(&mut self, min: usize) -> Result<usize, StateError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.0.len() {
            return Err(StateError::Truncated);
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, StateError> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        if bytes.contains(&0) {
            return Err(StateError::BadString);
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| StateError::BadString)
    }

    fn name(&mut self) -> Result<String, StateError> {
        let name = self.string()?;
        if name.is_empty() {
            return Err(StateError::EmptyName);
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> SessionState {
        SessionState {
            database: "app".into(),
            user: "alice".into(),
            application_name: "worker 7".into(),
            cancel_key: (4242, -17),
            wants: vec![
                (
                    "application_name".into(),
                    SettingValue::Text("worker 7".into()),
                ),
                (
                    "search_path".into(),
                    SettingValue::Sql("app, public".into()),
                ),
            ],
            greeted: vec![("server_version".into(), "17.2".into())],
            seen: vec![("application_name".into(), "worker 7".into())],
            statements: vec![PreparedState {
                name: "s1".into(),
                query: "SELECT $1::int".into(),
                param_types: vec![23],
            }],
            channels: vec!["jobs".into(), "Mixed Case".into()],
            server: None,
        }
    }

    fn pinned_sample() -> SessionState {
        let mut kinds = Kinds::default();
        kinds.insert(crate::stats::StateKind::TempTable);
        kinds.insert(crate::stats::StateKind::AdvisoryLock);
        SessionState {
            server: Some(ServerState {
                addr: CarriedAddr::Tcp("127.0.0.1:5432".parse().unwrap()),
                backend_key: (31337, 99),
                hold: Hold::Pinned(kinds),
                age_ms: 12_345,
                retire_in_ms: Some(3_600_000),
                params: vec![("TimeZone".into(), "UTC".into())],
                initial_params: vec![("TimeZone".into(), "Europe/Paris".into())],
                applied: vec![("work_mem".into(), SettingValue::Sql("'64MB'".into()))],
                prepared: vec![PreparedState {
                    name: "pgmux_s7".into(),
                    query: "SELECT $1::text".into(),
                    param_types: vec![25],
                }],
                prepared_unsure: true,
            }),
            ..sample()
        }
    }

    #[test]
    fn a_version_1_record_reads_without_channels() {
        let mut state = sample();
        state.channels.clear();
        let mut bytes = state.encode().unwrap();
        bytes[7] = 1;
        bytes.truncate(bytes.len() - 4); // no channels count
        assert_eq!(SessionState::decode(&bytes).unwrap(), state);
    }

    #[test]
    fn a_listen_plan_reads_back_and_every_truncation_is_refused() {
        let plan = HandoverPlan {
            database: "app".into(),
            user: "alice".into(),
            marker: "pgmux_upgrade_00ff".into(),
            clients: vec![
                ((1, -2), vec!["a".into(), "b".into()]),
                ((3, 4), vec!["a".into()]),
            ],
        };
        let bytes = encode_plan(&plan).unwrap();
        assert_eq!(decode_plan(&bytes).unwrap(), plan);
        for n in 0..bytes.len() {
            assert!(decode_plan(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut longer = bytes;
        longer.push(0);
        assert_eq!(decode_plan(&longer), Err(StateError::Trailing(1)));
    }

    #[test]
    fn a_session_reads_back() {
        let state = sample();
        let bytes = state.encode().unwrap();
        assert_eq!(SessionState::decode(&bytes).unwrap(), state);
    }

    #[test]
    fn a_session_with_its_server_reads_back_and_one_without_stays_version_2() {
        let pinned = pinned_sample();
        let bytes = pinned.encode().unwrap();
        assert_eq!(&bytes[6..8], &VERSION.to_be_bytes());
        assert_eq!(SessionState::decode(&bytes).unwrap(), pinned);
        let mut session = pinned_sample();
        if let Some(server) = session.server.as_mut() {
            server.hold = Hold::Session;
            server.addr = CarriedAddr::Unix("/run/postgresql/.s.PGSQL.5432".into());
            server.retire_in_ms = None;
        }
        let bytes = session.encode().unwrap();
        assert_eq!(SessionState::decode(&bytes).unwrap(), session);
        // Without a server: the format the pgmux before servers moved reads.
        let plain = sample().encode().unwrap();
        assert_eq!(&plain[6..8], &VERSION_NO_SERVER.to_be_bytes());
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_refused() {
        for state in [sample(), pinned_sample()] {
            let bytes = state.encode().unwrap();
            for n in 0..bytes.len() {
                assert!(SessionState::decode(&bytes[..n]).is_err(), "cut at {n}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(SessionState::decode(&longer), Err(StateError::Trailing(1)));
        }
    }

    #[test]
    fn a_bad_server_part_is_refused() {
        let bytes = pinned_sample().encode().unwrap();
        // The server part starts right after the client's statements.
        let mut plain = sample();
        plain.server = None;
        let at = plain.encode().unwrap().len();
        let mut bad_kind = bytes.clone();
        bad_kind[at] = 7;
        assert_eq!(
            SessionState::decode(&bad_kind),
            Err(StateError::BadAddrKind(7))
        );
        let mut state = pinned_sample();
        if let Some(server) = state.server.as_mut() {
            server.hold = Hold::Pinned(Kinds::default()); // a pin with no reason
        }
        let bytes = state.encode().unwrap();
        assert_eq!(SessionState::decode(&bytes), Err(StateError::BadKinds));
        // A version 2 record that says it has a server part: trailing bytes.
        let mut v2 = pinned_sample().encode().unwrap();
        v2[7] = 2;
        assert!(matches!(
            SessionState::decode(&v2),
            Err(StateError::Trailing(_))
        ));
    }

    #[test]
    fn another_version_and_lying_counts_are_refused() {
        let mut bytes = sample().encode().unwrap();
        bytes[7] = 9;
        assert_eq!(SessionState::decode(&bytes), Err(StateError::Version(9)));
        let mut huge = b"PGMUXS\0\x01".to_vec();
        for s in ["app", "u", ""] {
            huge.extend_from_slice(&(s.len() as u32).to_be_bytes());
            huge.extend_from_slice(s.as_bytes());
        }
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&u32::MAX.to_be_bytes()); // four billion settings
        assert_eq!(SessionState::decode(&huge), Err(StateError::Truncated));
    }

    #[test]
    fn a_nul_in_a_query_is_refused() {
        let mut state = sample();
        state.statements[0].query = "SELECT 1\0; DROP".into();
        let bytes = state.encode().unwrap();
        assert_eq!(SessionState::decode(&bytes), Err(StateError::BadString));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SessionState::decode(&bytes);
            let _ = decode_plan(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(flip in 0usize..400, to in any::<u8>(), pinned in any::<bool>()) {
            let state = if pinned { pinned_sample() } else { sample() };
            let mut bytes = state.encode().unwrap();
            let at = flip % bytes.len();
            bytes[at] = to;
            let _ = SessionState::decode(&bytes);
        }
    }
}

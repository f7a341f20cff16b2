//! Console sign-ins: a server-side table of sessions in memory.
//!
//! A session id is 256 random bits, sent to the browser only as an
//! HttpOnly, SameSite=Strict cookie. Each session also has its own random
//! CSRF token that every state-changing request must echo in the
//! [`CSRF_HEADER`] header. Sessions expire after the configured TTL and are
//! lost on restart (officers sign in again). The table holds at most
//! [`MAX_SESSIONS`]; expired ones are swept before a new one is refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::audit::Caller;
use crate::error::{Error, Result};
use crate::scope::SiteScope;

/// Name of the session cookie.
pub const COOKIE: &str = "niix_session";
/// Header carrying the session's CSRF token on POST requests.
pub const CSRF_HEADER: &str = "x-niix-csrf";
/// Most live sessions at once (bounds the table's memory).
pub const MAX_SESSIONS: usize = 10_000;

/// One signed-in officer.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who signed in: the identity and role of the token (or certificate).
    pub caller: Caller,
    /// The sites that identity may see.
    pub scope: SiteScope,
    /// The token every state-changing request must carry in [`CSRF_HEADER`].
    pub csrf: String,
    /// When the session ends.
    pub expires: Instant,
}

/// The table of live sessions.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    table: Mutex<HashMap<String, Session>>,
}

/// 256 random bits, hex.
pub(super) fn random_id() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Internal(format!("no randomness for a session id: {e}")))?;
    Ok(hex::encode(bytes))
}

impl Sessions {
    /// An empty table whose sessions last `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Sessions { ttl, table: Mutex::new(HashMap::new()) }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts a session; returns its id and the session.
    pub fn create(&self, caller: Caller, scope: SiteScope) -> Result<(String, Session)> {
        let id = random_id()?;
        let session = Session { caller, scope, csrf: random_id()?, expires: Instant::now() + self.ttl };
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= MAX_SESSIONS {
            let now = Instant::now();
            table.retain(|_, s| s.expires > now);
        }
        if table.len() >= MAX_SESSIONS {
            return Err(Error::ResourceExhausted(format!(
                "the console has {MAX_SESSIONS} open sessions; try again when some have expired or signed out"
            )));
        }
        table.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The live session `id`; UNAUTHENTICATED when it is unknown or expired
    /// (an expired one is removed).
    pub fn get(&self, id: &str) -> Result<Session> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match table.get(id) {
            Some(s) if s.expires > Instant::now() => Ok(s.clone()),
            Some(_) => {
                table.remove(id);
                Err(Error::Unauthenticated("your console session has expired: sign in again".into()))
            }
            None => Err(Error::Unauthenticated(
                "you are not signed in to the console (or the server restarted): sign in".into(),
            )),
        }
    }

    /// Ends session `id` (signing out).
    pub fn remove(&self, id: &str) {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn officer() -> Caller {
        Caller { identity: "officer-1".into(), role: "officer".into() }
    }

    #[test]
    fn ids_are_random_256_bit_and_sessions_expire() {
        let s = Sessions::new(Duration::from_millis(50));
        let (a, sa) = s.create(officer(), SiteScope::all()).unwrap();
        let (b, _) = s.create(officer(), SiteScope::all()).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_ne!(sa.csrf, a);
        assert_eq!(s.get(&a).unwrap().caller.identity, "officer-1");
        std::thread::sleep(Duration::from_millis(80));
        let e = s.get(&a).unwrap_err();
        assert!(matches!(e, Error::Unauthenticated(ref m) if m.contains("expired")), "{e}");
        assert!(matches!(s.get(&a).unwrap_err(), Error::Unauthenticated(ref m) if m.contains("not signed in")));
        s.remove(&b);
        assert!(s.get(&b).is_err());
    }
}

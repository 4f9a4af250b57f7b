//! What an API key (or, later, a portal session) may do: its scopes. Parsed
//! once, where a key is created or read back; checked by the API before any
//! use-case runs.

use std::fmt;
use std::str::FromStr;

/// One right. `Read` sees the tenant's configuration and delivery log (never a
/// secret), `Write` changes it, `Secrets` reads webhooks' signing secrets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Read,
    Write,
    Secrets,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Secrets];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Secrets => "secrets",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Secrets => 4,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes that always includes `read`: a key that may change or see
/// secrets may also see what it changes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("unknown scope `{0}` (the scopes are read, write and secrets)")]
    Unknown(String),
    #[error("a key needs at least one scope (read, write, secrets)")]
    Empty,
}

impl Scopes {
    /// Every right: what keys made before scopes existed, the bootstrap key
    /// and `dev`'s key hold, and what `apikey create` gives by default.
    pub const FULL: Scopes = Scopes(1 | 2 | 4);
    /// Reading only: for dashboards, support tools and read-only sessions.
    pub const READ_ONLY: Scopes = Scopes(1);
    /// Reading and changing, but no secret read back (a secret the caller
    /// itself sets or rotates is still returned to it).
    pub const READ_WRITE: Scopes = Scopes(1 | 2);

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |scope| self.contains(*scope))
    }
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| ScopeError::Unknown(text.trim().chars().take(32).collect()))
    }
}

/// `read,write` (comma-separated, any order, repeats allowed); `read` is
/// added when missing.
impl FromStr for Scopes {
    type Err = ScopeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut bits = 0;
        for part in text.split(',').filter(|part| !part.trim().is_empty()) {
            bits |= part.parse::<Scope>()?.bit();
        }
        if bits == 0 {
            return Err(ScopeError::Empty);
        }
        Ok(Scopes(bits | Scope::Read.bit()))
    }
}

/// The stored and printed form: `read,write,secrets`.
impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Scope::as_str).collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_print_and_always_include_read() {
        assert_eq!("read".parse::<Scopes>(), Ok(Scopes::READ_ONLY));
        assert_eq!("write".parse::<Scopes>(), Ok(Scopes::READ_WRITE));
        assert_eq!(" Write , read,write ".parse::<Scopes>(), Ok(Scopes::READ_WRITE));
        assert_eq!("secrets,write".parse::<Scopes>(), Ok(Scopes::FULL));
        assert_eq!(Scopes::FULL.to_string(), "read,write,secrets");
        assert_eq!(Scopes::READ_WRITE.to_string().parse::<Scopes>(), Ok(Scopes::READ_WRITE));
        assert!(!Scopes::READ_WRITE.contains(Scope::Secrets));
        assert!(Scopes::READ_ONLY.contains(Scope::Read));
        assert!(!Scopes::READ_ONLY.contains(Scope::Write));
    }

    #[test]
    fn unknown_and_empty_scopes_are_refused_by_name() {
        assert_eq!(
            "read,admin".parse::<Scopes>(),
            Err(ScopeError::Unknown("admin".to_owned()))
        );
        assert_eq!(" , ".parse::<Scopes>(), Err(ScopeError::Empty));
        assert!(
            ScopeError::Unknown("admin".to_owned())
                .to_string()
                .contains("read, write and secrets")
        );
    }
}

//! Access rules: which clients may log in, from where, to what, and how; evaluated before
//! authentication. First match wins; no match rejects. Written in the TOML
//! (`[[auth.rules]]`) or read from a `pg_hba.conf`-format file (`auth.hba_file`, see
//! [`super::hba`]); both become the same [`AccessRule`]s, held by the config.

use std::fmt;
use std::net::IpAddr;

use crate::config::AuthMethod;

/// One rule. Plain data, built at config load; matching is [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRule {
    /// Which connections: plain, TLS, or both.
    pub conn: ConnType,
    /// The database names the client may ask for.
    pub databases: Names,
    /// The user names.
    pub users: Names,
    /// The client addresses.
    pub addresses: Addresses,
    /// What a matching client gets.
    pub method: RuleMethod,
    /// Where the rule was written, as the client and the log name it: `rule 3` (the third
    /// `[[auth.rules]]`) or `hba_file line 12`.
    pub source: String,
}

/// The connection type of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnType {
    /// Any connection (`type = "all"`).
    All,
    /// TCP, with or without TLS (`host`).
    Host,
    /// TCP with TLS only (`hostssl`).
    HostSsl,
    /// TCP without TLS only (`hostnossl`).
    HostNoSsl,
}

impl ConnType {
    /// The TOML and pg_hba.conf spelling; `None` for an unknown one.
    pub fn parse(s: &str) -> Option<ConnType> {
        match s {
            "all" => Some(Self::All),
            "host" => Some(Self::Host),
            "hostssl" => Some(Self::HostSsl),
            "hostnossl" => Some(Self::HostNoSsl),
            _ => None,
        }
    }

    /// The spelling in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Host => "host",
            Self::HostSsl => "hostssl",
            Self::HostNoSsl => "hostnossl",
        }
    }

    fn matches(self, tls: bool) -> bool {
        match self {
            Self::All | Self::Host => true,
            Self::HostSsl => tls,
            Self::HostNoSsl => !tls,
        }
    }
}

/// A set of database or user names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Names {
    /// Every name (`all`).
    All,
    /// For databases: the database named like the user (`sameuser`).
    SameUser,
    /// These names (an empty list matches nothing).
    List(Vec<String>),
}

impl Names {
    fn matches(&self, name: &str, user: &str) -> bool {
        match self {
            Self::All => true,
            Self::SameUser => name == user,
            Self::List(names) => names.iter().any(|n| n == name),
        }
    }
}

/// A set of client addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addresses {
    /// Every address (`all`).
    All,
    /// One network.
    Net(Cidr),
}

/// An IPv4 or IPv6 network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Reads `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a single host). Host bits
    /// past the prefix are cleared, as PostgreSQL does.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("\"{s}\" is not an IP address or CIDR network"))?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => {
                    return Err(format!(
                        "\"{s}\": the prefix length must be a number from 0 to {max}"
                    ));
                }
            },
        };
        Ok(Cidr::new(addr, prefix))
    }

    /// The network of `addr` under `mask` (a netmask such as `255.255.0.0`), which must
    /// be of the same family and contiguous.
    pub fn with_mask(addr: IpAddr, mask: IpAddr) -> Result<Cidr, String> {
        let (bits, width) = match (addr, mask) {
            (IpAddr::V4(_), IpAddr::V4(m)) => (u128::from(u32::from(m)) << 96, 32),
            (IpAddr::V6(_), IpAddr::V6(m)) => (u128::from(m), 128),
            _ => return Err(format!("the mask {mask} is not of the family of {addr}")),
        };
        let prefix = bits.leading_ones();
        if bits.checked_shl(prefix).unwrap_or(0) != 0 || prefix > width {
            return Err(format!("the mask {mask} is not contiguous"));
        }
        Ok(Cidr::new(addr, prefix as u8))
    }

    fn new(addr: IpAddr, prefix: u8) -> Cidr {
        let net = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(prefix)).into()),
        };
        Cidr { net, prefix }
    }

    /// Whether `addr` is in the network. An IPv4-mapped IPv6 client address
    /// (`::ffff:10.1.2.3`, from a listener on `[::]`) counts as the IPv4 address.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.net, addr.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                u32::from(a) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                u128::from(a) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMethod {
    /// Log in with this method (over the user's `auth_method` and `auth.method`).
    Login(AuthMethod),
    /// Refuse the client.
    Reject,
}

impl RuleMethod {
    /// The TOML spelling (`scram-sha-256`, `md5`, `trust`, `reject`); `None` otherwise.
    pub fn parse(s: &str) -> Option<RuleMethod> {
        match s {
            "scram-sha-256" => Some(Self::Login(AuthMethod::ScramSha256)),
            "md5" => Some(Self::Login(AuthMethod::Md5)),
            "trust" => Some(Self::Login(AuthMethod::Trust)),
            "password" => Some(Self::Login(AuthMethod::Password)),
            "cert" => Some(Self::Login(AuthMethod::Cert)),
            "reject" => Some(Self::Reject),
            _ => None,
        }
    }

    /// The spelling in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Login(m) => m.as_str(),
            Self::Reject => "reject",
        }
    }
}

/// What a login asks for, as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The client's address.
    pub addr: IpAddr,
    /// Whether the connection is encrypted (always false until pgmux offers client TLS).
    pub tls: bool,
    /// The database the client asked for.
    pub database: &'a str,
    /// The user it logs in as.
    pub user: &'a str,
}

/// The outcome of the rules for one login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict<'r> {
    /// This rule lets the client log in with its method.
    Allow(&'r AccessRule, AuthMethod),
    /// This rule rejects the client, or (`None`) no rule matches it.
    Reject(Option<&'r AccessRule>),
}

/// The first rule that matches `req` decides; none rejects.
pub fn decide<'r>(rules: &'r [AccessRule], req: &Request<'_>) -> Verdict<'r> {
    let found = rules.iter().find(|r| {
        r.conn.matches(req.tls)
            && r.databases.matches(req.database, req.user)
            && r.users.matches(req.user, req.user)
            && match r.addresses {
                Addresses::All => true,
                Addresses::Net(net) => net.contains(req.addr),
            }
    });
    match found {
        Some(rule) => match rule.method {
            RuleMethod::Login(method) => Verdict::Allow(rule, method),
            RuleMethod::Reject => Verdict::Reject(Some(rule)),
        },
        None => Verdict::Reject(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parses_and_contains() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains(ip("10.255.1.2")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(
            net.contains(ip("::ffff:10.1.2.3")),
            "v4-mapped counts as v4"
        );
        assert!(!net.contains(ip("::1")));
        let host = Cidr::parse("192.168.1.7").unwrap();
        assert!(host.contains(ip("192.168.1.7")) && !host.contains(ip("192.168.1.8")));
        assert_eq!(
            Cidr::parse("192.168.1.7/24").unwrap().to_string(),
            "192.168.1.0/24"
        );
        let any = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(any.contains(ip("1.2.3.4")) && !any.contains(ip("::1")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("::1/128").unwrap().contains(ip("::1")));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "",
            "/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_from_a_mask() {
        let net = Cidr::with_mask(ip("172.16.5.4"), ip("255.255.0.0")).unwrap();
        assert_eq!(net.to_string(), "172.16.0.0/16");
        let all = Cidr::with_mask(ip("0.0.0.0"), ip("0.0.0.0")).unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6 = Cidr::with_mask(ip("fe80::"), ip("ffff:ffff::")).unwrap();
        assert_eq!(v6.to_string(), "fe80::/32");
        assert!(Cidr::with_mask(ip("10.0.0.0"), ip("255.0.255.0")).is_err());
        assert!(Cidr::with_mask(ip("10.0.0.0"), ip("ffff::")).is_err());
    }

    fn rule(conn: ConnType, db: Names, user: Names, addr: &str, method: RuleMethod) -> AccessRule {
        AccessRule {
            conn,
            databases: db,
            users: user,
            addresses: if addr == "all" {
                Addresses::All
            } else {
                Addresses::Net(Cidr::parse(addr).unwrap())
            },
            method,
            source: "rule".to_owned(),
        }
    }

    #[test]
    fn first_match_wins_and_no_match_rejects() {
        let list = |n: &[&str]| Names::List(n.iter().map(|s| s.to_string()).collect());
        let rules = [
            rule(
                ConnType::HostSsl,
                Names::All,
                Names::All,
                "all",
                RuleMethod::Login(AuthMethod::Trust),
            ),
            rule(
                ConnType::Host,
                list(&["app"]),
                list(&["bad"]),
                "all",
                RuleMethod::Reject,
            ),
            rule(
                ConnType::HostNoSsl,
                Names::SameUser,
                Names::All,
                "10.0.0.0/8",
                RuleMethod::Login(AuthMethod::Md5),
            ),
            rule(
                ConnType::All,
                list(&["app", "b"]),
                Names::All,
                "127.0.0.1",
                RuleMethod::Login(AuthMethod::ScramSha256),
            ),
        ];
        let req = |addr: &str, tls, database, user| Request {
            addr: ip(addr),
            tls,
            database,
            user,
        };
        let method = |v: Verdict<'_>| match v {
            Verdict::Allow(r, m) => Ok((r.source.clone(), m)),
            Verdict::Reject(r) => Err(r.is_some()),
        };
        assert_eq!(
            method(decide(&rules, &req("1.1.1.1", true, "x", "y"))).map(|x| x.1),
            Ok(AuthMethod::Trust)
        );
        assert_eq!(
            method(decide(&rules, &req("127.0.0.1", false, "app", "bad"))),
            Err(true)
        );
        assert_eq!(
            method(decide(&rules, &req("10.1.1.1", false, "eve", "eve"))).map(|x| x.1),
            Ok(AuthMethod::Md5)
        );
        assert_eq!(
            method(decide(&rules, &req("10.1.1.1", false, "app", "eve"))),
            Err(false)
        );
        assert_eq!(
            method(decide(&rules, &req("127.0.0.1", false, "b", "eve"))).map(|x| x.1),
            Ok(AuthMethod::ScramSha256)
        );
        assert_eq!(
            method(decide(&rules, &req("127.0.0.2", false, "b", "eve"))),
            Err(false)
        );
        assert_eq!(
            method(decide(&[], &req("127.0.0.1", false, "b", "eve"))),
            Err(false)
        );
    }

    proptest! {
        #[test]
        fn cidr_parse_never_panics(s in "\\PC{0,40}") {
            let _ = Cidr::parse(&s);
        }

        #[test]
        fn a_network_contains_its_own_addresses(a in any::<u32>(), prefix in 0u8..=32) {
            let addr = IpAddr::V4(a.into());
            let net = Cidr::parse(&format!("{addr}/{prefix}")).unwrap();
            prop_assert!(net.contains(addr));
        }
    }
}

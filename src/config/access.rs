//! `[auth]` access rules: `[[auth.rules]]` tables in the TOML, or `auth.hba_file` in
//! pg_hba.conf format. Both become [`AccessRule`]s in `auth.rules`; the matching is in
//! `crate::auth::rules`.

use std::path::Path;

use toml::de::DeValue;

use super::load::{Value, Walker};
use super::report::{Place, Places, Report, join_key};
use super::{AccessRule, Config};
use crate::auth::hba;
use crate::auth::rules::{Addresses, Cidr, ConnType, Names, RuleMethod};

/// The keys of one `[[auth.rules]]` table.
const RULE_KEYS: &[&str] = &["type", "database", "user", "address", "method"];

impl Walker<'_> {
    /// `auth.rules`: an array of tables, each a rule; every problem is reported at its
    /// line, and a rule with a problem is left out (the load fails anyway).
    pub(super) fn access_rules(&mut self, path: &str, value: &Value<'_>) -> Vec<AccessRule> {
        self.mark(path, value.span());
        let Some(items) = value.get_ref().as_array() else {
            self.wrong_type(path, value, "an array of tables ([[auth.rules]])");
            return Vec::new();
        };
        let mut rules = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(table) = self.table(&p, item) else {
                continue;
            };
            let mut rule = AccessRule {
                conn: ConnType::All,
                databases: Names::All,
                users: Names::All,
                addresses: Addresses::All,
                method: RuleMethod::Reject,
                source: format!("rule {}", i + 1),
            };
            let mut ok = true;
            let mut method = None;
            for (key, value) in table {
                let kp = join_key(&p, key.get_ref());
                let read = match key.get_ref().as_ref() {
                    "type" => self.string(&kp, value).and_then(|s| {
                        let conn = ConnType::parse(&s);
                        if conn.is_none() {
                            let msg = format!("unknown value \"{s}\"; expected one of \"host\", \"hostssl\", \"hostnossl\", \"all\"");
                            self.problem(&kp, value.span(), msg);
                        }
                        conn.map(|c| rule.conn = c)
                    }),
                    "database" => self.rule_names(&kp, value, true).map(|n| rule.databases = n),
                    "user" => self.rule_names(&kp, value, false).map(|n| rule.users = n),
                    "address" => self.string(&kp, value).and_then(|s| {
                        let addresses = if s == "all" {
                            Ok(Addresses::All)
                        } else {
                            Cidr::parse(&s).map(Addresses::Net)
                        };
                        match addresses {
                            Ok(a) => {
                                rule.addresses = a;
                                Some(())
                            }
                            Err(e) => {
                                self.problem(&kp, value.span(), e);
                                None
                            }
                        }
                    }),
                    "method" => self.string(&kp, value).and_then(|s| {
                        let m = RuleMethod::parse(&s);
                        if m.is_none() {
                            let msg = format!("unknown value \"{s}\"; expected one of \"scram-sha-256\", \"md5\", \"trust\", \"reject\"");
                            self.problem(&kp, value.span(), msg);
                        }
                        m.map(|m| method = Some(m))
                    }),
                    _ => {
                        self.unknown(&p, key, RULE_KEYS);
                        None
                    }
                };
                ok &= read.is_some();
            }
            match method {
                Some(m) => rule.method = m,
                None => {
                    if ok {
                        self.problem(
                            &p,
                            item.span(),
                            "needs a method (scram-sha-256, md5, password, cert, trust or reject)",
                        );
                    }
                    ok = false;
                }
            }
            if ok {
                rules.push(rule);
            }
        }
        rules
    }

    /// A rule's `database` or `user`: `"all"`, `"sameuser"` (databases), a name, or an
    /// array of names.
    fn rule_names(&mut self, path: &str, value: &Value<'_>, database: bool) -> Option<Names> {
        let names = match value.get_ref() {
            DeValue::String(_) => {
                let s = self.string(path, value)?;
                match s.as_str() {
                    "all" => return Some(Names::All),
                    "sameuser" if database => return Some(Names::SameUser),
                    _ => vec![s],
                }
            }
            _ => self.strings(path, value)?,
        };
        if names.iter().any(String::is_empty) {
            self.problem(path, value.span(), "a name must not be empty");
            return None;
        }
        Some(Names::List(names))
    }
}

/// Reads `auth.hba_file` (relative to `base`) into `auth.rules`; its problems are
/// reported with the file's name, line and column.
pub(super) fn merge_hba(config: &mut Config, base: &Path, places: &Places, report: &mut Report) {
    let Some(file) = &config.auth.hba_file else {
        return;
    };
    if !config.auth.rules.is_empty() {
        let msg = "set either auth.hba_file or [[auth.rules]], not both";
        report.at(places, "auth.hba_file", msg);
        return;
    }
    let path = base.join(file);
    config.auth.hba_file = Some(path.clone());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            let msg = format!("cannot read {}: {e}", path.display());
            report.at(places, "auth.hba_file", msg);
            return;
        }
    };
    let origin = path.display().to_string();
    let (rules, problems) = hba::parse(&text);
    for p in problems {
        let place = Place {
            origin: origin.clone(),
            line: p.line,
            column: p.column,
        };
        report.push(place.problem("", p.message));
    }
    config.auth.rules = rules;
}

/// The TOML that reads back as `rule` (for `pgmux check`).
pub(super) fn render_rule(rule: &AccessRule) -> String {
    let names = |n: &Names| match n {
        Names::All => "\"all\"".to_owned(),
        Names::SameUser => "\"sameuser\"".to_owned(),
        Names::List(list) => {
            let quoted: Vec<String> = list.iter().map(|s| super::masked::quote(s)).collect();
            format!("[{}]", quoted.join(", "))
        }
    };
    let address = match rule.addresses {
        Addresses::All => "all".to_owned(),
        Addresses::Net(net) => net.to_string(),
    };
    format!(
        "\n[[auth.rules]]\ntype = \"{}\"\ndatabase = {}\nuser = {}\naddress = \"{address}\"\nmethod = \"{}\"\n",
        rule.conn.as_str(),
        names(&rule.databases),
        names(&rule.users),
        rule.method.as_str(),
    )
}

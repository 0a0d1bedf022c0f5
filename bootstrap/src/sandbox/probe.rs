//! What the host allows, for `auto` and `required`: the plan's setup runs in forked children
//! (the very steps a plugin's spawn takes), dropping each mechanism that fails, until the rest
//! succeeds; and the report `bootstrap sandbox-probe` prints for the connector.

use std::path::PathBuf;

use super::child::probe_once;
use super::plan::{Needs, Plan};
use super::{Mechanism, Missing, Mode, Options, Report};

impl Plan {
    /// Finds what the host allows by running the setup in forked children, dropping each
    /// mechanism that fails until the rest succeeds.
    pub(super) fn probe(&mut self, root: bool, mut missing: Vec<Missing>) {
        let mut want: u32 = Mechanism::ALL.iter().map(|m| m.bit()).fold(0, |a, b| a | b);
        if root {
            want &= !Mechanism::UserNamespace.bit();
        } else {
            // Without root there is no other uid to become: the plugin keeps this one (never
            // root), confined by the user namespace.
            want &= !Mechanism::UnprivilegedUid.bit();
        }
        for m in &missing {
            if let Some(x) = Mechanism::ALL.iter().find(|x| x.name() == m.mechanism) {
                want &= !x.bit();
            }
        }
        for _ in 0..Mechanism::ALL.len() {
            self.active = want;
            let child = match self.child_plan(u64::MAX, &mut Vec::new()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "sandbox probe could not prepare");
                    break;
                }
            };
            match probe_once(&child) {
                Ok(()) => break,
                Err((step, errno)) => {
                    let failed = step.mechanism();
                    // A namespace that cannot be made takes everything built in it along.
                    let mut lost = failed.bit();
                    if matches!(failed, Mechanism::UserNamespace | Mechanism::PidNamespace) {
                        lost |= Mechanism::PidNamespace.bit()
                            | Mechanism::MountNamespace.bit()
                            | Mechanism::PrivateTmp.bit();
                    }
                    if failed == Mechanism::MountNamespace {
                        lost |= Mechanism::PrivateTmp.bit();
                    }
                    let err = std::io::Error::from_raw_os_error(errno);
                    for m in Mechanism::ALL.iter().filter(|m| lost & m.bit() & want != 0) {
                        missing.push(Missing {
                            mechanism: m.name(),
                            why: format!(
                                "{} failed ({err}){}",
                                step.what(),
                                if root {
                                    ""
                                } else {
                                    ": as a user other than root, the host must allow \
                                     unprivileged user namespaces (kernel.unprivileged_userns_clone=1, \
                                     user.max_user_namespaces > 0; in a container, a seccomp \
                                     profile that allows unshare and mount)"
                                }
                            ),
                        });
                    }
                    want &= !lost;
                }
            }
        }
        self.active = want;
        self.report.active = Mechanism::ALL
            .iter()
            .filter(|m| want & m.bit() != 0)
            .map(|m| m.name())
            .collect();
        missing.retain(|m| {
            Mechanism::ALL
                .iter()
                .any(|x| x.name() == m.mechanism && want & x.bit() == 0)
        });
        self.report.missing = missing;
    }
}

/// Prints what the host allows (`bootstrap sandbox-probe`): the connector's report.
pub fn probe_report(o: &Options) -> Report {
    let needs = Needs {
        plugin_dir: PathBuf::from("/"),
        function: "probe".into(),
        ..Needs::default()
    };
    let probe = Options {
        mode: Mode::Auto,
        ..o.clone()
    };
    match Plan::new(&probe, &needs) {
        Ok(Some(plan)) => Report {
            mode: o.mode,
            ..plan.report().clone()
        },
        _ => Report {
            mode: o.mode,
            active: Vec::new(),
            missing: Vec::new(),
        },
    }
}

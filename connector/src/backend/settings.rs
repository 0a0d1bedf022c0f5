//! What a packaged function runs with (environment, memory, timeout), computed once for every
//! backend that runs the Lambda zip: the Lambda backend sends it to AWS, the emulator backend
//! hands it to the function's process, so both run a package exactly alike.

use std::collections::BTreeMap;

use crate::packaging::FunctionConfig;

/// The operator's overrides of what the package's configuration says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// `SRI_LAMBDA_MEMORY_MB`.
    pub memory_mb: Option<i32>,
    /// `SRI_LAMBDA_TIMEOUT_S`.
    pub timeout_s: Option<i32>,
}

/// A function's settings. No `Debug`: `env` holds the signing keys.
pub struct FunctionSettings {
    /// Memory (MB), as Lambda's `MemorySize`.
    pub memory_mb: i32,
    /// Timeout (s), as Lambda's `Timeout`.
    pub timeout_s: i32,
    /// The function's environment (secrets included).
    pub env: BTreeMap<String, String>,
}

/// The settings of a function built with `config`, given the key ring it verifies with and
/// how it calls Dify back (`backwards_env`, from [`crate::relay::function_env`]).
pub fn function_settings(
    config: &FunctionConfig,
    overrides: Overrides,
    signing_keys: &crate::secret::Secret,
    backwards_env: &[(String, String)],
) -> FunctionSettings {
    let mut env = config.environment.clone();
    env.insert("SRI_SIGNING_KEYS".into(), signing_keys.0.clone());
    env.extend(backwards_env.iter().cloned());
    let timeout_s = overrides.timeout_s.unwrap_or(config.timeout_s as i32);
    // The plugin must give up before Lambda kills the sandbox, so the caller gets a
    // PluginTimeout event rather than a cut stream.
    env.insert(
        "PLUGIN_MAX_EXECUTION_TIMEOUT".into(),
        plugin_budget(timeout_s).to_string(),
    );
    FunctionSettings {
        memory_mb: overrides.memory_mb.unwrap_or(config.memory_mb as i32),
        timeout_s,
        env,
    }
}

/// Seconds a plugin call may take in a function with `timeout_s`: up to 15 s less, to report
/// the timeout before the platform ends the call.
pub fn plugin_budget(timeout_s: i32) -> i32 {
    (timeout_s - timeout_s.min(30) / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packaging::{Arch, PythonVersion, Target};

    #[test]
    fn overrides_win_and_the_plugin_times_out_first() {
        let config = FunctionConfig::template(&Target {
            arch: Arch::X86_64,
            python: PythonVersion::Py312,
        });
        let keys = crate::secret::Secret("k1:AAAA".into());
        let backwards = [("SRI_RELAY_URL".to_owned(), "http://r".to_owned())];
        let s = function_settings(&config, Overrides::default(), &keys, &backwards);
        assert_eq!(s.memory_mb, config.memory_mb as i32);
        assert_eq!(s.env["SRI_SIGNING_KEYS"], "k1:AAAA");
        assert_eq!(s.env["SRI_RELAY_URL"], "http://r");
        let s = function_settings(
            &config,
            Overrides {
                memory_mb: Some(256),
                timeout_s: Some(4),
            },
            &keys,
            &[],
        );
        assert_eq!((s.memory_mb, s.timeout_s), (256, 4));
        assert_eq!(s.env["PLUGIN_MAX_EXECUTION_TIMEOUT"], "2");
        assert!(!s.env.contains_key("DIFY_PLUGIN_DAEMON_URL"));
        assert!(plugin_budget(900) < 900 && plugin_budget(1) == 1);
    }
}

//! Offline checks of `infra/`: the SAM stack, its lint canary and the compose file.
//!
//! cfn-lint (>= 1.54) does not expand `AWS::Serverless::*`, so the template is linted twice: as
//! written and as transformed by aws-sam-translator (`tests/tooling/sam_translate.py`).
//! checkov reads both. The canary (`infra/tests/canary.yaml`) is broken on purpose and must
//! keep tripping the rule ids below, so a linter upgrade that stops checking something fails
//! here instead of passing silently. Tools come from `.venv/infra` (`make tools`).

use harness::root;
use harness::sri::TempDir;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the canary must trip, and where (`true`: on the transformed JSON, `false`: on the SAM
/// file as written). The three `AWS::Serverless::Function` mistakes are invisible in the SAM
/// file (cfn-lint does not transform it): that gap is why the transform is linted at all.
const CANARY_CFN_LINT: [(&str, bool); 5] = [
    ("E3030", true),  // Architectures: [arm], InvokeMode: STREAMING
    ("E3717", true),  // Timeout: 1200
    ("W3037", true),  // lambda:InvokeFunctionURL2
    ("E6101", false), // an output value that is a list (reported on both)
    ("E6101", true),
];
/// checkov, on the transformed JSON: the Function URL with `AuthType: NONE`.
const CANARY_CHECKOV: [&str; 1] = ["CKV_AWS_258"];

const TRANSFORM_TIMEOUT: Duration = Duration::from_secs(60);
const CFN_LINT_TIMEOUT: Duration = Duration::from_secs(120);
const CHECKOV_TIMEOUT: Duration = Duration::from_secs(180);

/// A tool of the infra lint venv.
fn tool(name: &str) -> PathBuf {
    let path = root().join(".venv/infra/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make tools` (it installs tests/tooling/requirements-infra.txt into .venv/infra)",
        path.display()
    );
    path
}

/// A finished subprocess.
struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion, killing it after `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Run {
    let what = format!("{cmd:?}");
    cmd.current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Offline: no telemetry, no instance metadata, no update checks.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("BC_SKIP_MAPPING", "TRUE")
        .env("CHECKOV_RUN_SCA_PACKAGE_SCAN_V2", "false");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    // Drain both pipes while waiting, so a chatty tool never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {timeout:?}; output so far:\n{}\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        what,
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `template` transformed to plain CloudFormation JSON in `dir`.
fn transform(template: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{}.json",
        template.file_stem().unwrap().to_string_lossy()
    ));
    let mut cmd = Command::new(tool("python"));
    cmd.arg(root().join("tests/tooling/sam_translate.py"))
        .arg(template)
        .arg(&out);
    let r = run(cmd, TRANSFORM_TIMEOUT);
    assert_eq!(
        r.code,
        Some(0),
        "the offline SAM transform of {} failed:\n{}",
        template.display(),
        r.show()
    );
    out
}

/// cfn-lint findings on `files`: (rule id, "file:line: message") pairs.
fn cfn_lint(files: &[&Path]) -> (Vec<(String, String)>, Run) {
    let mut cmd = Command::new(tool("cfn-lint"));
    cmd.args(["--format", "parseable", "--"]).args(files);
    let r = run(cmd, CFN_LINT_TIMEOUT);
    // Exit codes are a bit mask of error (2), warning (4), informational (8); 1 is a crash.
    assert!(
        matches!(r.code, Some(c) if c & 1 == 0),
        "cfn-lint crashed:\n{}",
        r.show()
    );
    // `file:line:col:endline:endcol:RULE:message`, the file possibly containing no colon here.
    let findings = r
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let parts: Vec<&str> = l.splitn(7, ':').collect();
            let rule = parts.get(5).copied().unwrap_or("?").to_string();
            (rule, l.to_string())
        })
        .collect();
    (findings, r)
}

/// checkov's reports (one per file) on `files`.
fn checkov(files: &[&Path]) -> (Vec<Value>, Run) {
    let mut cmd = Command::new(tool("checkov"));
    cmd.args([
        "--skip-download",
        "--framework",
        "cloudformation",
        "--output",
        "json",
    ]);
    for f in files {
        cmd.arg("--file").arg(f);
    }
    let r = run(cmd, CHECKOV_TIMEOUT);
    let parsed: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("checkov's output is not JSON ({e}):\n{}", r.show()));
    // One framework gives an object, several a list.
    let reports = match parsed {
        Value::Array(v) => v,
        v => vec![v],
    };
    for rep in &reports {
        assert!(
            rep.get("results").is_some(),
            "checkov scanned nothing (no `results`; did it fail to parse the template?):\n{}",
            r.show()
        );
        let errors = &rep["results"]["parsing_errors"];
        assert!(
            errors.as_array().is_none_or(|e| e.is_empty()),
            "checkov could not parse {errors}:\n{}",
            r.show()
        );
    }
    (reports, r)
}

/// `(check id, resource, file)` of every check in `key` (`failed_checks`, `skipped_checks`).
fn checks(reports: &[Value], key: &str) -> Vec<(String, String, String)> {
    reports
        .iter()
        .flat_map(|rep| rep["results"][key].as_array().cloned().unwrap_or_default())
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("?").to_string();
            (s("check_id"), s("resource"), s("file_path"))
        })
        .collect()
}

fn template() -> PathBuf {
    root().join("infra/template.yaml")
}

/// infra/template.yaml transformed, once per test process (the translator takes seconds to
/// start): each test writes it into its own directory when it needs a file.
fn transformed() -> &'static Value {
    static ONCE: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = TempDir::new("infra-transform");
        let json = transform(&template(), dir.path());
        let text = std::fs::read_to_string(&json).expect("read the transform");
        serde_json::from_str(&text).expect("the transform is JSON")
    })
}

/// The transformed template as a file in `dir`.
fn transformed_file(dir: &Path) -> PathBuf {
    let path = dir.join("template.json");
    let text = serde_json::to_string_pretty(transformed()).expect("JSON");
    std::fs::write(&path, text).expect("write the transform");
    path
}

fn yaml(path: &Path) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

#[test]
fn template_is_clean_under_cfn_lint_as_written_and_transformed() {
    let dir = TempDir::new("infra-lint");
    let json = transformed_file(dir.path());
    let (findings, r) = cfn_lint(&[&template(), &json]);
    assert!(
        findings.is_empty() && r.code == Some(0),
        "cfn-lint findings on infra/template.yaml or its transform ({}):\n{}\n\n{}",
        json.display(),
        findings
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        r.show()
    );
}

#[test]
fn template_passes_checkov_and_every_suppression_is_used() {
    let dir = TempDir::new("infra-checkov");
    let json = transformed_file(dir.path());
    let (reports, r) = checkov(&[&template(), &json]);
    let failed = checks(&reports, "failed_checks");
    assert!(
        failed.is_empty(),
        "checkov failed checks (fix them, or skip one in the resource's Metadata with a reason \
         only when it is a false positive for this design):\n{}\n\n{}",
        failed
            .iter()
            .map(|(id, res, file)| format!("  {id} {res} ({file})"))
            .collect::<Vec<_>>()
            .join("\n"),
        r.show()
    );
    // A skip that checkov no longer needs hides the next real finding on that resource.
    let skipped: BTreeSet<(String, String)> = checks(&reports, "skipped_checks")
        .into_iter()
        .map(|(id, res, _)| (id, res.rsplit('.').next().unwrap_or("").to_string()))
        .collect();
    let declared = yaml(&template());
    let resources = declared["Resources"]
        .as_mapping()
        .expect("infra/template.yaml has Resources");
    let mut stale = Vec::new();
    for (name, res) in resources {
        let name = name.as_str().unwrap_or("?").to_string();
        for skip in res["Metadata"]["checkov"]["skip"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
        {
            let id = skip["id"].as_str().unwrap_or("?").to_string();
            assert!(
                skip["comment"].as_str().is_some_and(|c| c.len() > 20),
                "checkov skip {id} on {name} needs a `comment` saying why it is a false positive"
            );
            if !skipped.contains(&(id.clone(), name.clone())) {
                stale.push(format!("{id} on {name}"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "checkov skips in infra/template.yaml that no check uses any more (remove them): {stale:?}"
    );
}

#[test]
fn canary_keeps_tripping_the_expected_rules() {
    let dir = TempDir::new("infra-canary");
    let canary = root().join("infra/tests/canary.yaml");
    let json = transform(&canary, dir.path());

    let (findings, lint_run) = cfn_lint(&[&canary, &json]);
    // The parseable format starts each finding with the file it is in.
    let json_name = json.to_string_lossy().to_string();
    let reported: BTreeSet<(&str, bool)> = findings
        .iter()
        .map(|(rule, line)| (rule.as_str(), line.starts_with(&json_name)))
        .collect();
    let missing: Vec<String> = CANARY_CFN_LINT
        .iter()
        .filter(|r| !reported.contains(*r))
        .map(|(id, on_json)| {
            let file = if *on_json {
                "the transformed JSON"
            } else {
                "canary.yaml"
            };
            format!("{id} on {file}")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "cfn-lint no longer reports {missing:?} (a linter upgrade weakened a check, or the canary \
         changed); it reported {reported:?}\n{}",
        lint_run.show()
    );

    let (reports, ck_run) = checkov(&[&json]);
    let failed: BTreeSet<String> = checks(&reports, "failed_checks")
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let missing: Vec<_> = CANARY_CHECKOV
        .iter()
        .filter(|id| !failed.contains(**id))
        .collect();
    assert!(
        missing.is_empty(),
        "checkov no longer reports {missing:?} on the transformed canary; it reported {failed:?}\n{}",
        ck_run.show()
    );
}

fn resource<'a>(t: &'a Value, logical: &str) -> &'a Value {
    let r = &t["Resources"][logical];
    assert!(!r.is_null(), "the stack has no resource {logical}");
    r
}

#[test]
fn connector_policy_grants_exactly_the_backends_calls_on_prefixed_functions() {
    let t = transformed();
    let doc = &resource(t, "ConnectorPolicy")["Properties"]["PolicyDocument"];
    // A statement under `Fn::If` (the capacity provider's) is checked as its granting branch.
    let statements: Vec<Value> = doc["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .map(|st| match st.get("Fn::If") {
            Some(branches) => branches[1].clone(),
            None => st.clone(),
        })
        .collect();
    let actions = |st: &Value| -> Vec<String> {
        match &st["Action"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_string()).collect(),
            other => panic!("unexpected Action {other}"),
        }
    };
    let mut granted = BTreeSet::new();
    for st in &statements {
        assert_eq!(st["Effect"], "Allow", "{st}");
        let resources = match &st["Resource"] {
            Value::Array(a) => a.clone(),
            r => vec![r.clone()],
        };
        for a in actions(st) {
            assert!(
                !a.contains('*'),
                "wildcard action {a} in the connector policy"
            );
            // Only the List calls without resource-level permissions may be granted on `*`.
            if resources.iter().any(|r| r == "*") {
                assert!(
                    a == "lambda:ListFunctions" || a == "lambda:ListLayers",
                    "{a} is granted on `*`"
                );
            }
            if a == "lambda:PassCapacityProvider" {
                for r in &resources {
                    let sub = r["Fn::Sub"].as_str().unwrap_or_default();
                    assert!(
                        sub.ends_with(":capacity-provider:${Prefix}-sri-plugins"),
                        "{a} is not scoped to the stack's capacity provider: {r}"
                    );
                }
            } else if a.contains("Layer") && a != "lambda:ListLayers" {
                for r in &resources {
                    let sub = r["Fn::Sub"].as_str().unwrap_or_default();
                    assert!(
                        sub.contains(":layer:${Prefix}-"),
                        "{a} is not scoped to the prefix's layers: {r}"
                    );
                }
            } else if a.starts_with("lambda:")
                && a != "lambda:ListFunctions"
                && a != "lambda:ListLayers"
            {
                for r in &resources {
                    let sub = r["Fn::Sub"].as_str().unwrap_or_default();
                    assert!(
                        sub.contains(":function:${Prefix}-*"),
                        "{a} is not scoped to the prefix's functions: {r}"
                    );
                }
            }
            granted.insert(a);
        }
    }
    let expected: BTreeSet<String> = [
        "lambda:CreateFunction",
        "lambda:GetFunction",
        "lambda:GetFunctionConfiguration",
        "lambda:UpdateFunctionCode",
        "lambda:UpdateFunctionConfiguration",
        "lambda:PublishVersion",
        "lambda:ListVersionsByFunction",
        "lambda:CreateAlias",
        "lambda:UpdateAlias",
        "lambda:GetAlias",
        "lambda:DeleteFunction",
        "lambda:CreateFunctionUrlConfig",
        "lambda:GetFunctionUrlConfig",
        "lambda:UpdateFunctionUrlConfig",
        "lambda:AddPermission",
        "lambda:GetPolicy",
        "lambda:TagResource",
        "lambda:ListTags",
        "lambda:ListFunctions",
        "lambda:InvokeFunctionUrl",
        "lambda:InvokeFunction",
        "lambda:GetLayerVersion",
        "lambda:PublishLayerVersion",
        "lambda:ListLayerVersions",
        "lambda:DeleteLayerVersion",
        "lambda:ListLayers",
        "lambda:PassCapacityProvider",
        "iam:PassRole",
        "secretsmanager:GetSecretValue",
        "kms:Decrypt",
        "kms:Encrypt",
        "kms:GenerateDataKey",
        "kms:CreateGrant",
        "s3:PutObject",
        "s3:GetObject",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        granted,
        expected,
        "the connector policy's actions changed: added {:?}, removed {:?}",
        granted.difference(&expected).collect::<Vec<_>>(),
        expected.difference(&granted).collect::<Vec<_>>()
    );
    let pass = statements
        .iter()
        .find(|s| actions(s).contains(&"iam:PassRole".to_string()))
        .unwrap();
    assert_eq!(
        pass["Condition"]["StringEquals"]["iam:PassedToService"], "lambda.amazonaws.com",
        "iam:PassRole must be limited to Lambda: {pass}"
    );
}

#[test]
fn sample_function_runs_the_layer_bootstrap_behind_an_iam_streaming_url() {
    let t = transformed();
    let f = &resource(t, "SampleFunction")["Properties"];
    let env = &f["Environment"]["Variables"];
    assert_eq!(env["AWS_LAMBDA_EXEC_WRAPPER"], "/opt/bootstrap", "{env}");
    assert_eq!(env["SRI_PYTHON"], "/var/lang/bin/python3", "{env}");
    // Backwards calls go through the connector's relay, never to the daemon's port.
    assert!(env["DIFY_PLUGIN_DAEMON_URL"].is_null(), "{env}");
    assert_eq!(env["SRI_BACKWARDS"], "relay", "{env}");
    for k in [
        "SRI_SIGNING_KEYS",
        "SRI_RELAY_URL",
        "PLUGIN_MAX_EXECUTION_TIMEOUT",
        "PLUGIN_RUNTIME_MAX_BUFFER_SIZE",
        "MAX_SERVERLESS_REQUEST_BYTES",
    ] {
        assert!(!env[k].is_null(), "the sample function lacks {k}: {env}");
    }
    assert_eq!(f["Runtime"], "python3.12");
    assert_eq!(f["Architectures"], serde_json::json!(["arm64"]));
    assert!(
        f["Layers"].to_string().contains("BootstrapLayerArm64"),
        "the arm64 function must use the arm64 bootstrap layer: {}",
        f["Layers"]
    );
    assert!(
        !f["KmsKeyArn"].is_null(),
        "the environment holds the ring: encrypt it"
    );
    let max_exec: u64 = env["PLUGIN_MAX_EXECUTION_TIMEOUT"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        max_exec < f["Timeout"].as_u64().unwrap(),
        "PLUGIN_MAX_EXECUTION_TIMEOUT must end before the function's timeout"
    );
    let url = &resource(t, "SampleFunctionUrl")["Properties"];
    assert_eq!(url["AuthType"], "AWS_IAM", "{url}");
    assert_eq!(url["InvokeMode"], "RESPONSE_STREAM", "{url}");
    for out in [
        "SampleFunctionUrl",
        "ConnectorPolicyArn",
        "SigningSecretArn",
        "ArtifactBucketName",
        "PluginFunctionRoleArn",
        "EncryptionKeyArn",
        "BootstrapLayerArm64Arn",
        "BootstrapLayerX8664Arn",
    ] {
        assert!(!t["Outputs"][out].is_null(), "the stack lacks output {out}");
    }
}

#[test]
fn compose_points_the_daemon_at_the_connector_with_the_lambda_backend() {
    let compose = yaml(&root().join("infra/compose.yaml"));
    let services = &compose["services"];
    let env = |svc: &str| -> BTreeMap<String, String> {
        let e = &services[svc]["environment"];
        let map = e
            .as_mapping()
            .unwrap_or_else(|| panic!("infra/compose.yaml: {svc}.environment must be a map"));
        map.iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_string(),
                    v.as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };

    // The daemon's own variable names (dify-plugin-daemon internal/types/app/config.go).
    let daemon = env("plugin_daemon");
    assert_eq!(
        daemon.get("PLATFORM").map(String::as_str),
        Some("serverless")
    );
    let connector_url = daemon
        .get("DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL")
        .expect("plugin_daemon needs DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL");
    assert_eq!(connector_url, "http://sri-connector:5004");
    let key_ref = |v: &str| v.split(":?").next().unwrap_or("").to_string();
    let daemon_key = key_ref(
        daemon
            .get("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY")
            .expect("plugin_daemon needs DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY"),
    );

    let connector = env("sri-connector");
    assert_eq!(
        daemon_key,
        key_ref(&connector["DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY"]),
        "the daemon and the connector must share one API key variable"
    );
    assert!(
        daemon_key.starts_with("${DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY"),
        "the API key comes from the environment, never from the file: {daemon_key}"
    );
    assert_eq!(connector["SRI_BACKEND"], "lambda");
    assert!(
        connector["SRI_LISTEN"].ends_with(":5004"),
        "the connector must listen where the daemon's URL points"
    );
    for k in [
        "AWS_REGION",
        "SRI_LAMBDA_ROLE_ARN",
        "SRI_LAMBDA_PREFIX",
        "SRI_LAMBDA_ARCH",
        "SRI_LAMBDA_PYTHON",
        "SRI_LAMBDA_MEMORY_MB",
        "SRI_LAMBDA_TIMEOUT_S",
        "SRI_LAMBDA_TRANSPORT",
        "SRI_ARTIFACT_BUCKET",
        "SRI_SIGNING_KEYS_SECRET_ID",
        "SRI_LAMBDA_KMS_KEY_ARN",
        "SRI_BOOTSTRAP_LAYER_ARN",
        "DIFY_PLUGIN_DAEMON_URL",
        "SRI_PUBLIC_URL",
        "SRI_RELAY_LISTEN",
        "SRI_RELAY_PUBLIC_URL",
    ] {
        assert!(
            connector.contains_key(k),
            "infra/compose.yaml: sri-connector lacks {k}"
        );
    }
    // The daemon stays private: the relay forwards to its address inside the compose network,
    // nothing asks for a public daemon URL, and the only published port is the relay's.
    assert_eq!(
        connector["DIFY_PLUGIN_DAEMON_URL"],
        "http://plugin_daemon:5002"
    );
    assert!(
        !std::fs::read_to_string(root().join("infra/compose.yaml"))
            .unwrap()
            .contains("SRI_DAEMON_PUBLIC_URL"),
        "infra/compose.yaml still asks for the daemon's public URL"
    );
    assert_eq!(connector["SRI_BACKWARDS"], "relay");
    let relay_port = connector["SRI_RELAY_LISTEN"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let ports: Vec<String> = services["sri-connector"]["ports"]
        .as_sequence()
        .map(|p| {
            p.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ports.len(), 1, "publish the relay's port alone: {ports:?}");
    assert!(
        ports[0].ends_with(&format!(":{relay_port}")),
        "the published port is not the relay's: {ports:?}"
    );
    assert!(
        services["plugin_daemon"]["ports"].is_null(),
        "the daemon's port must not be published"
    );
    // Nothing secret written into the file: every credential is an interpolation or unset.
    for (k, v) in connector.iter().chain(daemon.iter()) {
        if k.contains("KEY") && !k.ends_with("_ARN") && !k.ends_with("_ID")
            || k.contains("SECRET_ACCESS")
        {
            assert!(
                v.is_empty() || v.starts_with("${"),
                "{k} has a literal value in infra/compose.yaml"
            );
        }
    }
    let build = &services["sri-connector"]["build"];
    let dockerfile = build["dockerfile"].as_str().expect("build.dockerfile");
    assert!(
        root().join(dockerfile).exists(),
        "{dockerfile} (relative to the repository root, the build context) is missing"
    );
}

#[test]
fn samconfig_lints_on_validate_and_deploys_with_iam_capabilities() {
    let path = root().join("infra/samconfig.toml");
    let text = std::fs::read_to_string(&path).expect("infra/samconfig.toml");
    let has = |section: &str, line: &str| {
        let body = text
            .split(&format!("[{section}]"))
            .nth(1)
            .unwrap_or_else(|| panic!("samconfig.toml has no [{section}]"));
        let body = body.split("\n[").next().unwrap();
        assert!(
            body.lines().any(|l| l.trim() == line),
            "samconfig.toml [{section}] lacks `{line}`"
        );
    };
    assert!(text.lines().any(|l| l.trim() == "version = 0.1"));
    has("default.validate.parameters", "lint = true");
    has(
        "default.deploy.parameters",
        "capabilities = \"CAPABILITY_IAM CAPABILITY_NAMED_IAM\"",
    );
    has("default.deploy.parameters", "resolve_s3 = true");
}

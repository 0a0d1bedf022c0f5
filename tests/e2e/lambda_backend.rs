//! The Lambda backend (`sri serve` with `SRI_BACKEND=lambda`) against `moto_server` as the AWS
//! control plane, driven through the control plane exactly as the Go daemon drives it.
//!
//! Each test starts its own moto and connector. The plugin is the sample plugin with no
//! dependencies (what is checked here is the deployment, not the packaging, which has its own
//! tests), and the functions are x86_64 so that the host's debug `bootstrap` can be packaged.

use aws_sdk_lambda::Client as Lambda;
use connector::backend::lambda::{
    LambdaBackend, LambdaContext, LambdaOptions, Transport, lambda_function_name,
};
use connector::backend::{Backend, Function, is_function_name};
use connector::packaging::{Arch, PythonVersion};
use connector::secret::Secret;
use connector::transport::Target;
use harness::difypkg::{Package, collect_dir, sample_as};
use harness::godaemon::{GoDaemon, LaunchOutcome};
use harness::moto::Moto;
use harness::sri::{Connector, ConnectorOptions, TempDir};
use harness::{plugin_dir, root};
use std::sync::Arc;
use std::time::Duration;

const LAUNCH_BUDGET: Duration = Duration::from_secs(180);

/// The sample plugin with no dependencies, at `version` (a new version = a changed package).
fn plugin(version: &str) -> Package {
    let files: Vec<(String, Vec<u8>)> = collect_dir(&plugin_dir("sample"))
        .into_iter()
        .map(|(path, content)| match path.as_str() {
            "requirements.txt" => (path, Vec::new()),
            "manifest.yaml" => {
                let text = String::from_utf8(content).expect("utf-8 manifest");
                let text = text.replacen("version: 0.1.0", &format!("version: {version}"), 1);
                (path, text.into_bytes())
            }
            _ => (path, content),
        })
        .collect();
    Package::from_files(&files)
}

struct Setup {
    moto: Moto,
    connector: Connector,
    lambda: Lambda,
    role: String,
    prefix: String,
    _cache: TempDir,
}

impl Setup {
    async fn start(extra: &[(&str, &str)]) -> Self {
        Self::start_on(Moto::start().await, extra).await
    }

    async fn start_on(moto: Moto, extra: &[(&str, &str)]) -> Self {
        let role = moto.create_role("sri-plugin-exec").await;
        let cache = TempDir::new("lambda-cache");
        // Unique per test so that nothing one test made can look like another's.
        let prefix = format!("t{}", std::process::id() % 100000);
        let mut opts = ConnectorOptions::default()
            .env("SRI_BACKEND", "lambda")
            .env("SRI_LAMBDA_ROLE_ARN", role.clone())
            .env("SRI_LAMBDA_PREFIX", prefix.clone())
            .env("SRI_LAMBDA_ARCH", "x86_64")
            .env(
                "SRI_LAMBDA_BOOTSTRAP",
                harness::stripped_bootstrap().display().to_string(),
            )
            .env("SRI_CACHE_DIR", cache.path().display().to_string())
            .env("DIFY_PLUGIN_DAEMON_URL", "http://daemon.internal:5002")
            .env("SRI_RELAY_PUBLIC_URL", "https://relay.example.com")
            .env(
                "SRI_UV",
                root().join(".venv/tools/bin/uv").display().to_string(),
            );
        for (k, v) in moto.env() {
            opts = opts.env(&k, v);
        }
        for (k, v) in extra {
            opts = opts.env(k, *v);
        }
        let connector = Connector::start_with(opts);
        let lambda = Lambda::new(&moto.sdk().await);
        Self {
            moto,
            connector,
            lambda,
            role,
            prefix,
            _cache: cache,
        }
    }

    fn daemon(&self) -> GoDaemon {
        self.connector.daemon().with_launch_timeout(LAUNCH_BUDGET)
    }

    /// Launches through the control plane; returns the function's connector-level name.
    async fn launch(&self, pkg: &Package) -> String {
        let o = self
            .daemon()
            .launch_package(pkg, false)
            .await
            .unwrap_or_else(|e| panic!("launch refused: {e}\n{}", self.connector.log_tail(60)));
        let ctx = || {
            format!(
                "\n{}\nconnector logs:\n{}",
                o.transcript(),
                self.connector.log_tail(60)
            )
        };
        assert!(
            o.failures().is_empty(),
            "failed: {:?}{}",
            o.failures(),
            ctx()
        );
        let (name, _endpoint) = o
            .installed
            .clone()
            .unwrap_or_else(|| panic!("not installed: {:?}{}", o.install_errors, ctx()));
        name
    }

    /// Launches a package the connector must refuse; returns the outcome and its failures, one
    /// a line.
    async fn launch_failing(&self, pkg: &Package) -> (LaunchOutcome, String) {
        let o = self
            .daemon()
            .launch_package(pkg, false)
            .await
            .unwrap_or_else(|e| panic!("launch refused: {e}"));
        let failures = o.failures().join("\n");
        (o, failures)
    }

    /// Makes function `name` behind the connector's back, with `zip` as its code.
    async fn create_function(&self, name: &str, zip: &[u8], tags: &[(&str, &str)]) {
        let mut req = self
            .lambda
            .create_function()
            .function_name(name)
            .runtime(aws_sdk_lambda::types::Runtime::Python312)
            .role(&self.role)
            .handler("x")
            .code(
                aws_sdk_lambda::types::FunctionCode::builder()
                    .zip_file(aws_sdk_lambda::primitives::Blob::new(zip))
                    .build(),
            );
        for (k, v) in tags {
            req = req.tags(*k, *v);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("CreateFunction {name}: {e:?}"));
    }

    fn function_name(&self) -> String {
        lambda_function_name(&self.prefix, "sri", "sample")
    }

    async fn versions(&self) -> Vec<(String, String)> {
        let out = self
            .lambda
            .list_versions_by_function()
            .function_name(self.function_name())
            .send()
            .await
            .expect("ListVersionsByFunction");
        out.versions()
            .iter()
            .filter(|v| v.version() != Some("$LATEST"))
            .map(|v| {
                (
                    v.version().unwrap_or_default().to_owned(),
                    v.description().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    async fn live(&self) -> String {
        self.lambda
            .get_alias()
            .function_name(self.function_name())
            .name("live")
            .send()
            .await
            .expect("GetAlias live")
            .function_version()
            .unwrap_or_default()
            .to_owned()
    }

    async fn gc(&self, keep: usize) -> serde_json::Value {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/gc?keep={keep}", self.connector.url()))
            .header("authorization", harness::sri::API_KEY)
            .send()
            .await
            .expect("POST /v1/gc");
        assert!(r.status().is_success(), "gc: {}", r.status());
        r.json().await.expect("gc JSON")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn launch_deploys_a_versioned_streaming_function_and_relaunch_changes_nothing() {
    let s = Setup::start(&[]).await;
    let v1 = plugin("0.1.0");
    let name = s.launch(&v1).await;
    assert!(
        name.starts_with(&s.function_name()) && name.ends_with(&v1.checksum[..32]),
        "deployment name {name} names the function and the checksum"
    );

    let f = s
        .lambda
        .get_function()
        .function_name(s.function_name())
        .send()
        .await
        .expect("the function exists");
    let c = f.configuration().expect("configuration");
    assert_eq!(c.runtime().map(|r| r.as_str()), Some("python3.12"));
    assert_eq!(
        c.architectures()
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>(),
        ["x86_64"]
    );
    assert_eq!(c.role(), Some(s.role.as_str()));
    let env = c
        .environment()
        .and_then(|e| e.variables())
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        env.get("AWS_LAMBDA_EXEC_WRAPPER").map(String::as_str),
        Some("/var/task/bin/bootstrap"),
        "env: {:?}",
        env.keys()
    );
    assert_eq!(
        env.get("SRI_SIGNING_KEYS"),
        Some(&harness::keys_env(&[harness::SECRET_A]))
    );
    // Functions get the relay's public URL, never the daemon's (private) address.
    assert_eq!(
        env.get("SRI_RELAY_URL").map(String::as_str),
        Some("https://relay.example.com")
    );
    assert_eq!(env.get("SRI_BACKWARDS").map(String::as_str), Some("relay"));
    assert!(
        !env.contains_key("DIFY_PLUGIN_DAEMON_URL"),
        "{:?}",
        env.keys()
    );
    assert!(env.contains_key("PLUGIN_MAX_EXECUTION_TIMEOUT"));
    let tags = f.tags().cloned().unwrap_or_default();
    assert_eq!(
        tags.get("sri:managed-by").map(String::as_str),
        Some("sri-connector")
    );
    assert_eq!(
        tags.get("sri:plugin").map(String::as_str),
        Some("sri/sample")
    );
    assert_eq!(tags.get("sri:checksum"), Some(&v1.checksum));
    // The signing keys are secrets: never in the connector's logs.
    let secret_b64 = harness::keys_env(&[harness::SECRET_A]);
    let secret_b64 = secret_b64.split(':').nth(1).expect("kid:secret");
    assert!(
        !s.connector.logs().iter().any(|l| l.contains(secret_b64)),
        "a signing key appeared in the connector's logs"
    );

    let versions = s.versions().await;
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert!(versions[0].1.contains(&v1.checksum), "{versions:?}");
    assert_eq!(s.live().await, versions[0].0);

    let url = s
        .lambda
        .get_function_url_config()
        .function_name(s.function_name())
        .qualifier("live")
        .send()
        .await
        .expect("a Function URL");
    assert_eq!(url.auth_type().as_str(), "AWS_IAM");
    assert_eq!(
        url.invoke_mode().map(|m| m.as_str()),
        Some("RESPONSE_STREAM")
    );
    let policy = s
        .lambda
        .get_policy()
        .function_name(s.function_name())
        .qualifier("live")
        .send()
        .await
        .expect("a resource policy");
    let policy = policy.policy().unwrap_or_default();
    assert!(
        policy.contains("lambda:InvokeFunctionUrl") && policy.contains("lambda:InvokeFunction\""),
        "policy: {policy}"
    );

    // Relaunch: nothing changes.
    let before = c.last_modified().map(str::to_owned);
    let again = s.launch(&v1).await;
    assert_eq!(again, name);
    assert_eq!(s.versions().await, versions, "relaunch published a version");
    let after = s
        .lambda
        .get_function()
        .function_name(s.function_name())
        .send()
        .await
        .expect("GetFunction");
    assert_eq!(
        after
            .configuration()
            .and_then(|c| c.last_modified())
            .map(str::to_owned),
        before,
        "relaunch modified the function"
    );

    // A changed package: new code, a new version, and `live` moves to it.
    let v2 = plugin("0.2.0");
    let name2 = s.launch(&v2).await;
    assert_ne!(name2, name);
    let versions2 = s.versions().await;
    assert_eq!(versions2.len(), 2, "{versions2:?}");
    let newest = versions2
        .iter()
        .find(|(_, d)| d.contains(&v2.checksum))
        .expect("a version for the new checksum");
    assert_eq!(s.live().await, newest.0, "live follows the new version");
    let code = s
        .lambda
        .get_function()
        .function_name(s.function_name())
        .send()
        .await
        .expect("GetFunction");
    assert_ne!(
        code.configuration().and_then(|c| c.code_sha256()),
        c.code_sha256(),
        "the code was updated"
    );
    let listed = s.daemon().list_instances(None).await.expect("instances");
    assert_eq!(listed.len(), 2, "both versions are installed: {listed:?}");

    // gc keeps the newest per plugin: the old version goes, the live one stays.
    let removed = s.gc(1).await;
    assert!(
        removed.to_string().contains(&name),
        "gc removed {removed} (expected {name})"
    );
    let left = s.versions().await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].1.contains(&v2.checksum));
    assert_eq!(s.live().await, left[0].0);
    drop(s.moto);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_deploy_converges_and_gc_spares_what_is_not_ours() {
    let s = Setup::start(&[]).await;
    let sdk = s.moto.sdk().await;
    let lambda = Lambda::new(&sdk);
    let dummy_zip = harness::difypkg::zip_files(&[("x.txt".into(), b"half-done".to_vec())]);
    // Functions made behind the connector's back, with our ownership tag or without.
    let ours = [("sri:managed-by", "sri-connector")];
    // What a deploy leaves when the connector dies right after CreateFunction: our function,
    // tagged, with other code, no version, no alias, no URL.
    s.create_function(&s.function_name(), &dummy_zip, &ours)
        .await;
    // A function that is not ours, with our prefix.
    let foreign = format!("{}-someone-else", s.prefix);
    s.create_function(&foreign, &dummy_zip, &[]).await;
    // A leftover of ours that never got a version (a plugin whose first deploy died).
    let leftover = format!("{}-sri-gone", s.prefix);
    s.create_function(&leftover, &dummy_zip, &ours).await;

    let v1 = plugin("0.1.0");
    s.launch(&v1).await;
    let versions = s.versions().await;
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(s.live().await, versions[0].0);
    let f = lambda
        .get_function()
        .function_name(s.function_name())
        .send()
        .await
        .expect("GetFunction");
    let env = f
        .configuration()
        .and_then(|c| c.environment())
        .and_then(|e| e.variables())
        .cloned()
        .unwrap_or_default();
    assert!(
        env.contains_key("AWS_LAMBDA_EXEC_WRAPPER"),
        "the configuration converged: {:?}",
        env.keys()
    );
    lambda
        .get_function_url_config()
        .function_name(s.function_name())
        .qualifier("live")
        .send()
        .await
        .expect("the URL was created");

    let removed = s.gc(1).await;
    let removed = removed.to_string();
    assert!(removed.contains(&leftover), "gc removed {removed}");
    assert!(!removed.contains(&foreign), "gc removed {removed}");
    lambda
        .get_function()
        .function_name(&foreign)
        .send()
        .await
        .expect("a function without our tag survives gc");
    assert!(
        lambda
            .get_function()
            .function_name(&leftover)
            .send()
            .await
            .is_err(),
        "our leftover is gone"
    );
    assert_eq!(
        s.versions().await.len(),
        1,
        "the live deployment survives gc"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_connector_finds_its_functions_and_reads_keys_from_a_secret() {
    let moto = Moto::start().await;
    // The shape infra/'s stack generates: 64 letters and digits under `secret`.
    let generated = "Zq8vJ2mT4xR7nB1cW5yH9kL3pD6fG0sAZq8vJ2mT4xR7nB1cW5yH9kL3pD6fG0sA";
    let secret_arn = moto
        .create_secret(
            "sri-signing",
            &format!(r#"{{"kid":"k1","secret":"{generated}"}}"#),
        )
        .await;
    let role = moto.create_role("sri-plugin-exec").await;
    let cache = TempDir::new("lambda-cache");
    let opts = || {
        let mut o = ConnectorOptions::default()
            .env("SRI_BACKEND", "lambda")
            .env("SRI_SIGNING_KEYS", "")
            .env("SRI_SIGNING_KEYS_SECRET_ID", secret_arn.clone())
            .env("SRI_LAMBDA_ROLE_ARN", role.clone())
            .env("SRI_LAMBDA_PREFIX", "rs")
            .env("SRI_LAMBDA_ARCH", "x86_64")
            .env(
                "SRI_LAMBDA_BOOTSTRAP",
                harness::stripped_bootstrap().display().to_string(),
            )
            .env("SRI_CACHE_DIR", cache.path().display().to_string());
        for (k, v) in moto.env() {
            o = o.env(&k, v);
        }
        o
    };
    let mut c = Connector::start_with(opts());
    let o = c
        .daemon()
        .with_launch_timeout(LAUNCH_BUDGET)
        .launch_package(&plugin("0.1.0"), false)
        .await
        .expect("launch");
    let (name, _) = o
        .installed
        .clone()
        .unwrap_or_else(|| panic!("{}\n{}", o.transcript(), c.log_tail(60)));
    let lambda = Lambda::new(&moto.sdk().await);
    let env = lambda
        .get_function_configuration()
        .function_name(lambda_function_name("rs", "sri", "sample"))
        .send()
        .await
        .expect("GetFunctionConfiguration")
        .environment()
        .and_then(|e| e.variables())
        .cloned()
        .unwrap_or_default();
    let ring = env.get("SRI_SIGNING_KEYS").expect("SRI_SIGNING_KEYS set");
    assert_eq!(ring, &format!("k1:{generated}"));
    assert!(
        !c.logs().iter().any(|l| l.contains(generated)),
        "the secret appeared in the logs"
    );

    // A rotation (infra/README.md): the secret gets a new signing key, the old one verifies.
    let rotated = "Rt5wQ8zX2cV6bN0mK4jH7gF1dS3aP9oLRt5wQ8zX2cV6bN0mK4jH7gF1dS3aP9oL";
    moto.put_secret(
        &secret_arn,
        &format!(r#"{{"kid":"k2","secret":"{rotated}","verify":"k1:{generated}"}}"#),
    )
    .await;
    let live_before = lambda
        .get_alias()
        .function_name(lambda_function_name("rs", "sri", "sample"))
        .name("live")
        .send()
        .await
        .expect("GetAlias")
        .function_version()
        .map(str::to_owned);

    c.restart();
    let listed = c.daemon().list_instances(None).await.expect("instances");
    assert!(
        listed.iter().any(|i| format!("{i:?}").contains(&name)),
        "the restarted connector lists {name}: {listed:?}\n{}",
        c.log_tail(40)
    );
    // The live version's environment is immutable: the restarted connector republished it
    // with the new ring and moved `live`.
    let live = lambda
        .get_function_configuration()
        .function_name(lambda_function_name("rs", "sri", "sample"))
        .qualifier("live")
        .send()
        .await
        .expect("GetFunctionConfiguration live");
    assert_ne!(live.version().map(str::to_owned), live_before, "live moved");
    assert_eq!(
        live.environment()
            .and_then(|e| e.variables())
            .and_then(|v| v.get("SRI_SIGNING_KEYS"))
            .map(String::as_str),
        Some(format!("k2:{rotated},k1:{generated}").as_str()),
        "the live version verifies with the rotated ring\n{}",
        c.log_tail(40)
    );
    assert_eq!(
        c.daemon()
            .list_instances(None)
            .await
            .expect("instances")
            .len(),
        1,
        "one deployment, republished (not a second one)"
    );
}

/// The sample plugin carrying `extra` incompressible bytes (a zip over Lambda's 50 MiB
/// direct-upload limit).
fn big_plugin(extra: usize) -> Package {
    let mut files = collect_dir(&plugin_dir("sample"));
    for (path, content) in files.iter_mut() {
        if path == "requirements.txt" {
            content.clear();
        }
    }
    // xorshift: incompressible, reproducible, no dependency.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let blob: Vec<u8> = (0..extra)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    files.push(("_assets/model.bin".into(), blob));
    Package::from_files(&files)
}

#[tokio::test(flavor = "multi_thread")]
async fn zips_over_50_mib_go_through_the_artifact_bucket_or_fail_naming_it() {
    let size_env = [("MAX_PLUGIN_PACKAGE_SIZE", "125829120")];
    let pkg = big_plugin(52 * 1024 * 1024);

    // No bucket configured: the launch fails and says what to set.
    let s = Setup::start(&size_env).await;
    let (o, failures) = s.launch_failing(&pkg).await;
    assert!(
        failures.contains("SRI_ARTIFACT_BUCKET") && failures.contains("50 MiB"),
        "the failure names the fix: {failures}\n{}",
        o.transcript()
    );
    drop(s);

    // With the bucket: uploaded under the prefix, and the function is created from S3.
    let moto = Moto::start().await;
    moto.create_bucket("sri-artifacts").await;
    let s = Setup::start_on(
        moto,
        &[size_env[0], ("SRI_ARTIFACT_BUCKET", "sri-artifacts")],
    )
    .await;
    s.launch(&pkg).await;
    let f = s
        .lambda
        .get_function()
        .function_name(s.function_name())
        .send()
        .await
        .expect("the function exists");
    let size = f.configuration().map(|c| c.code_size()).unwrap_or_default();
    assert!(size > 50 * 1024 * 1024, "code size {size}");
    let listing = reqwest::get(format!("{}/sri-artifacts?list-type=2", s.moto.url))
        .await
        .expect("ListObjectsV2")
        .text()
        .await
        .expect("listing");
    assert!(
        listing.contains(&format!("<Key>{}/{}/", s.prefix, s.function_name())),
        "the zip is under the prefix: {listing}"
    );
}

/// One connector replica's Lambda backend, in this process, on `moto`, with the settings
/// [`Setup`] gives the connector process. `route_ttl_ms` 0: the replica asks AWS what `live`
/// runs before every Function URL call, so what the tests check does not depend on timing.
async fn replica(moto: &Moto, role: &str, prefix: &str, cache: &TempDir) -> Arc<LambdaBackend> {
    replica_with(moto, role, prefix, cache, false).await
}

/// [`replica`], with the shared SDK layer on or off.
async fn replica_with(
    moto: &Moto,
    role: &str,
    prefix: &str,
    cache: &TempDir,
    sdk_layer: bool,
) -> Arc<LambdaBackend> {
    let options = LambdaOptions {
        region: Some(harness::moto::REGION.into()),
        endpoint_url: Some(moto.url.clone()),
        role_arn: Some(role.into()),
        prefix: prefix.into(),
        arch: Arch::X86_64,
        python: PythonVersion::Py312,
        memory_mb: None,
        timeout_s: None,
        transport: Transport::FunctionUrl,
        route_ttl_ms: 0,
        artifact_bucket: None,
        kms_key_arn: None,
        bootstrap_layer_arn: None,
        invoker_principal: None,
        snap_start: false,
        sdk_layer,
        capacity_provider_arn: None,
        max_concurrency: None,
        bootstrap: Some(harness::stripped_bootstrap()),
        wheelhouse: None,
        offline: false,
        cache_dir: cache.path().to_path_buf(),
    };
    let context = LambdaContext {
        signing_keys: Secret(harness::keys_env(&[harness::SECRET_A])),
        backwards_env: Vec::new(),
        uv: root().join(".venv/tools/bin/uv"),
        index_url: None,
        install_timeout: std::time::Duration::from_secs(900),
    };
    LambdaBackend::open(&moto.sdk().await, options, context)
        .await
        .expect("a replica opens on moto")
}

/// Deploys `pkg` on one replica (what its `/v1/launch` does).
async fn deploy(r: &LambdaBackend, pkg: &Package) -> Function {
    let p = connector::package::Package::read(bytes::Bytes::from(pkg.bytes.clone()))
        .expect("a readable package");
    let (progress, _ignored) = tokio::sync::mpsc::unbounded_channel();
    r.deploy(&p, progress)
        .await
        .unwrap_or_else(|e| panic!("deploy {}: {e}", pkg.unique_identifier()))
}

/// Where AWS says a call for the package with `checksum` must go: the Function URL while `live`
/// runs the version published for it, else that exact version.
async fn expected(lambda: &Lambda, aws_name: &str, checksum: &str) -> Target {
    let versions = lambda
        .list_versions_by_function()
        .function_name(aws_name)
        .send()
        .await
        .expect("ListVersionsByFunction");
    let version = versions
        .versions()
        .iter()
        .filter(|v| v.description().is_some_and(|d| d.contains(checksum)))
        .filter_map(|v| v.version()?.parse::<u64>().ok())
        .max()
        .unwrap_or_else(|| panic!("no version of {aws_name} for {checksum}"))
        .to_string();
    let live = lambda
        .get_alias()
        .function_name(aws_name)
        .name("live")
        .send()
        .await
        .expect("GetAlias live");
    if live.function_version() == Some(version.as_str()) {
        let url = lambda
            .get_function_url_config()
            .function_name(aws_name)
            .qualifier("live")
            .send()
            .await
            .expect("GetFunctionUrlConfig");
        Target::FunctionUrl {
            url: url.function_url().to_owned(),
            region: harness::moto::REGION.into(),
            function: aws_name.to_owned(),
        }
    } else {
        Target::InvokeStream {
            function: aws_name.to_owned(),
            qualifier: version,
        }
    }
}

/// Every replica routes every launched deployment where AWS says it must go.
async fn assert_routes(
    stage: &str,
    replicas: &[&Arc<LambdaBackend>],
    lambda: &Lambda,
    aws_name: &str,
    launched: &[Function],
) {
    for (i, r) in replicas.iter().enumerate() {
        for f in launched {
            let got = r
                .wait_target(&f.name, Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("{stage}: replica {i} does not know {}", f.name));
            let want = expected(lambda, aws_name, &f.checksum).await;
            assert_eq!(
                got, want,
                "{stage}: replica {i} routes {} ({}) elsewhere",
                f.name, f.identifier
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapstart_creates_the_function_with_snapstart_and_publishes_a_snapshotted_version() {
    let moto = Moto::start().await;
    moto.start_recording().await;
    let s = Setup::start_on(moto, &[("SRI_LAMBDA_SNAPSTART", "true")]).await;
    s.launch(&plugin("0.1.0")).await;
    let calls = s.moto.recorded();
    let create = calls
        .iter()
        .position(|(m, url, _)| m == "POST" && url.ends_with("/2015-03-31/functions"))
        .unwrap_or_else(|| panic!("no CreateFunction among {} requests", calls.len()));
    let body: serde_json::Value = serde_json::from_str(&calls[create].2).expect("JSON body");
    assert_eq!(
        body["SnapStart"],
        serde_json::json!({"ApplyOn": "PublishedVersions"}),
        "CreateFunction turns SnapStart on: {body}"
    );
    assert!(
        body.get("CapacityProviderConfig").is_none(),
        "no capacity provider unless asked: {body}"
    );
    let published = calls
        .iter()
        .position(|(m, url, _)| m == "POST" && url.contains("/versions"))
        .expect("PublishVersion");
    assert!(
        published > create,
        "the version is published after SnapStart is on"
    );
    // The snapshotted version is waited for before `live` points at it.
    let after = &calls[published..];
    let alias = after
        .iter()
        .position(|(_, url, _)| url.contains("/aliases"))
        .expect("alias calls after PublishVersion");
    let version_wait = after
        .iter()
        .position(|(m, url, _)| m == "GET" && (url.contains("%3A1") || url.contains(":1")));
    assert!(
        version_wait.is_some_and(|w| w < alias),
        "GetFunction on version 1 before the alias: {:?}",
        after
            .iter()
            .map(|(m, u, _)| format!("{m} {u}"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_whose_names_clean_alike_get_their_own_functions() {
    let s = Setup::start(&[]).await;
    let mut launched = Vec::new();
    for (author, name) in [
        ("acme", "foo_bar"),
        ("acme", "foo-bar"),
        ("acme-foo", "bar"),
    ] {
        let pkg = Package::from_files(&sample_as(author, name, "0.1.0", false));
        let deployment = s.launch(&pkg).await;
        let aws_name = lambda_function_name(&s.prefix, author, name);
        assert!(
            deployment.starts_with(&format!("{aws_name}-")) && is_function_name(&deployment),
            "{deployment} is a deployment of {aws_name}"
        );
        let f = s
            .lambda
            .get_function()
            .function_name(&aws_name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{author}/{name} has its own function {aws_name}: {e:?}"));
        let tags = f.tags().cloned().unwrap_or_default();
        assert_eq!(
            tags.get("sri:plugin"),
            Some(&format!("{author}/{name}")),
            "{aws_name}"
        );
        assert_eq!(tags.get("sri:checksum"), Some(&pkg.checksum), "{aws_name}");
        launched.push((aws_name, deployment, pkg.checksum.clone()));
    }
    for (i, a) in launched.iter().enumerate() {
        for b in &launched[i + 1..] {
            assert!(a.0 != b.0 && a.1 != b.1, "shared: {a:?} {b:?}");
        }
    }
    // A function whose tag names another plugin is never taken over, whatever its name.
    let taken = lambda_function_name(&s.prefix, "acme", "taken");
    s.create_function(
        &taken,
        &harness::difypkg::zip_files(&[("x.txt".into(), b"not yours".to_vec())]),
        &[
            ("sri:managed-by", "sri-connector"),
            ("sri:plugin", "someone/else"),
        ],
    )
    .await;
    let pkg = Package::from_files(&sample_as("acme", "taken", "0.1.0", false));
    let (o, failures) = s.launch_failing(&pkg).await;
    assert!(
        failures.contains("someone/else") && failures.contains("acme/taken"),
        "the failure names both plugins: {failures}\n{}",
        o.transcript()
    );
    assert!(o.installed.is_none(), "{}", o.transcript());

    // Each deployment's calls reach its own function and version (as a second replica routes
    // them, from what AWS says).
    let cache = TempDir::new("lambda-cache-replica");
    let r = replica(&s.moto, &s.role, &s.prefix, &cache).await;
    for (aws_name, deployment, checksum) in &launched {
        let got = r
            .wait_target(deployment, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("the replica does not know {deployment}"));
        assert_eq!(got, expected(&s.lambda, aws_name, checksum).await);
        match got {
            Target::FunctionUrl { .. } => {}
            other => panic!("the only version of {aws_name} is live: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_route_every_call_to_the_version_it_was_launched_for() {
    let moto = Moto::start().await;
    let role = moto.create_role("sri-plugin-exec").await;
    let prefix = format!("r{}", std::process::id() % 100000);
    let (cache_a, cache_b) = (
        TempDir::new("lambda-cache-a"),
        TempDir::new("lambda-cache-b"),
    );
    let a = replica(&moto, &role, &prefix, &cache_a).await;
    let b = replica(&moto, &role, &prefix, &cache_b).await;
    let lambda = Lambda::new(&moto.sdk().await);
    let aws_name = lambda_function_name(&prefix, "sri", "sample");
    let both = [&a, &b];
    let mut launched = Vec::new();

    launched.push(deploy(&a, &plugin("0.1.0")).await);
    assert_routes("A launched 0.1.0", &both, &lambda, &aws_name, &launched).await;

    // B moves `live` to 0.2.0; A, which made 0.1.0 live, must now call 0.1.0 by version.
    launched.push(deploy(&b, &plugin("0.2.0")).await);
    assert_routes("B launched 0.2.0", &both, &lambda, &aws_name, &launched).await;
    assert!(
        matches!(
            a.wait_target(&launched[0].name, Duration::from_secs(5))
                .await,
            Some(Target::InvokeStream { .. })
        ),
        "A calls the old version by its number"
    );

    launched.push(deploy(&a, &plugin("0.3.0")).await);
    assert_routes("A launched 0.3.0", &both, &lambda, &aws_name, &launched).await;

    // B relaunches the first package: its version is reused and `live` goes back to it.
    let again = deploy(&b, &plugin("0.1.0")).await;
    assert_eq!(again, launched[0]);
    assert_routes("B relaunched 0.1.0", &both, &lambda, &aws_name, &launched).await;
    assert!(
        matches!(
            a.wait_target(&launched[0].name, Duration::from_secs(5))
                .await,
            Some(Target::FunctionUrl { .. })
        ),
        "live runs 0.1.0 again"
    );
    let versions = lambda
        .list_versions_by_function()
        .function_name(&aws_name)
        .send()
        .await
        .expect("ListVersionsByFunction");
    assert_eq!(
        versions.versions().len(),
        4,
        "$LATEST and one version per package"
    );
}

/// The versions of this test's SDK layers: (layer version ARN, description).
async fn sdk_layer_versions(lambda: &Lambda, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let layers = lambda.list_layers().send().await.expect("ListLayers");
    for l in layers.layers() {
        let name = l.layer_name().unwrap_or_default();
        if !name.starts_with(&format!("{prefix}-sdk-")) {
            continue;
        }
        let versions = lambda
            .list_layer_versions()
            .layer_name(name)
            .send()
            .await
            .expect("ListLayerVersions");
        for v in versions.layer_versions() {
            out.push((
                v.layer_version_arn().unwrap_or_default().to_owned(),
                v.description().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn the_sdk_layer_is_published_once_reused_by_two_plugins_and_collected_by_gc() {
    let moto = Moto::start().await;
    let role = moto.create_role("sri-plugin-exec").await;
    let prefix = format!("l{}", std::process::id() % 100000);
    let cache = TempDir::new("layer-cache");
    // uv's downloads are shared with the packaging tests: only the first run fetches the SDK.
    let shared = root().join("target/sri-test-uv-cache");
    std::fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, cache.path().join("uv")).unwrap();
    let r = replica_with(&moto, &role, &prefix, &cache, true).await;
    let lambda = Lambda::new(&moto.sdk().await);

    let a = Package::from_files(&sample_as("acme", "layer_a", "0.1.0", true));
    let b = Package::from_files(&sample_as("acme", "layer_b", "0.1.0", true));
    let fa = deploy(&r, &a).await;
    let fb = deploy(&r, &b).await;

    let versions = sdk_layer_versions(&lambda, &prefix).await;
    assert_eq!(
        versions.len(),
        1,
        "one layer version for two plugins of one SDK version: {versions:?}"
    );
    let (arn, description) = &versions[0];
    assert!(
        description.contains("dify_plugin=") && description.contains("sha256="),
        "{description}"
    );
    for (name, f) in [("layer_a", &fa), ("layer_b", &fb)] {
        let aws_name = lambda_function_name(&prefix, "acme", name);
        let config = lambda
            .get_function_configuration()
            .function_name(&aws_name)
            .send()
            .await
            .expect("GetFunctionConfiguration");
        let layers: Vec<&str> = config.layers().iter().filter_map(|l| l.arn()).collect();
        assert_eq!(layers, [arn.as_str()], "{} carries the SDK layer", f.name);
        let env = config.environment().and_then(|e| e.variables()).unwrap();
        assert_eq!(
            env.get("SRI_PYTHONPATH").map(String::as_str),
            Some("/var/task/vendor:/opt/python"),
            "the plugin's own vendor/ comes first"
        );
    }

    // A redeploy, and another replica (a restarted connector), publish nothing.
    deploy(&r, &a).await;
    let other = replica_with(&moto, &role, &prefix, &cache, true).await;
    deploy(&other, &b).await;
    assert_eq!(
        sdk_layer_versions(&lambda, &prefix).await,
        versions,
        "a redeploy reuses the layer"
    );

    // gc keeps a layer a function still uses, and deletes it once none does.
    r.remove(&fa.name).await.expect("remove a");
    let removed = r.gc(1).await.expect("gc");
    assert!(
        !removed.contains(arn),
        "b still uses the layer: {removed:?}"
    );
    assert_eq!(sdk_layer_versions(&lambda, &prefix).await.len(), 1);
    r.remove(&fb.name).await.expect("remove b");
    let removed = r.gc(1).await.expect("gc");
    assert!(removed.contains(arn), "gc removed {removed:?}");
    assert!(
        sdk_layer_versions(&lambda, &prefix).await.is_empty(),
        "no layer version left"
    );

    // A version that claims the layer's hash in its description but holds other content (one
    // published by hand, say) is not reused: the deploy publishes the real one beside it.
    // arn:aws:lambda:{region}:{account}:layer:{name}:{version}
    let layer_name = arn.split(':').nth(6).unwrap();
    let forged = lambda
        .publish_layer_version()
        .layer_name(layer_name)
        .description(description)
        .content(
            aws_sdk_lambda::types::LayerVersionContentInput::builder()
                .zip_file(aws_sdk_lambda::primitives::Blob::new(
                    harness::difypkg::zip_files(&[("python/x.py".into(), b"x = 1\n".to_vec())]),
                ))
                .build(),
        )
        .send()
        .await
        .expect("PublishLayerVersion by hand");
    let forged = forged.layer_version_arn().unwrap().to_owned();
    let fa = deploy(&r, &a).await;
    let versions = sdk_layer_versions(&lambda, &prefix).await;
    assert_eq!(versions.len(), 2, "forged {forged}: {versions:?}");
    let config = lambda
        .get_function_configuration()
        .function_name(lambda_function_name(&prefix, "acme", "layer_a"))
        .send()
        .await
        .expect("GetFunctionConfiguration");
    let layers: Vec<&str> = config.layers().iter().filter_map(|l| l.arn()).collect();
    assert_eq!(layers.len(), 1, "{layers:?}");
    assert_ne!(layers[0], forged, "{} got the forged layer", fa.name);
}

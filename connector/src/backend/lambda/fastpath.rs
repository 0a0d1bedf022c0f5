//! Lambda's fast paths for the plugin functions, in one place: SnapStart (an initialised
//! sandbox restored from a snapshot instead of a fresh Python import) and Lambda Managed
//! Instances (functions on an operator's capacity provider, many invocations per sandbox).
//! Checks the settings once, at start, and maps them onto the function configuration.

use aws_sdk_lambda::types::{
    CapacityProviderConfig, FunctionConfiguration, LambdaManagedInstancesCapacityProviderConfig,
    SnapStart, SnapStartApplyOn,
};

use super::LambdaOptions;
use crate::Error;
use crate::packaging::PythonVersion;

/// Refuses settings AWS would refuse at the first deploy, saying what to change.
pub(super) fn check(o: &LambdaOptions) -> Result<(), Error> {
    if o.snap_start && o.python == PythonVersion::Py311 {
        return Err(Error::Backend(
            "SRI_LAMBDA_SNAPSTART=true needs a managed Python runtime with SnapStart \
             (python3.12 or later): set SRI_LAMBDA_PYTHON=3.12 or 3.13, or turn SnapStart off"
                .into(),
        ));
    }
    if o.capacity_provider_arn.is_none() {
        if o.max_concurrency.is_some() {
            return Err(Error::Backend(
                "SRI_LAMBDA_MAX_CONCURRENCY applies only to functions on a capacity provider: \
                 set SRI_LAMBDA_CAPACITY_PROVIDER_ARN too, or unset it"
                    .into(),
            ));
        }
        return Ok(());
    }
    if o.snap_start {
        // AWS documents SnapStart for functions on the default capacity only.
        return Err(Error::Backend(
            "SRI_LAMBDA_SNAPSTART and SRI_LAMBDA_CAPACITY_PROVIDER_ARN are not combined (AWS \
             documents SnapStart for the default capacity only): unset one of them"
                .into(),
        ));
    }
    if o.python != PythonVersion::Py313 {
        return Err(Error::Backend(
            "Lambda Managed Instances run Python 3.13 and later: set SRI_LAMBDA_PYTHON=3.13 \
             with SRI_LAMBDA_CAPACITY_PROVIDER_ARN"
                .into(),
        ));
    }
    Ok(())
}

/// The SnapStart setting: snapshots of published versions when on.
pub(super) fn snap_start(o: &LambdaOptions) -> SnapStart {
    SnapStart::builder()
        .apply_on(if o.snap_start {
            SnapStartApplyOn::PublishedVersions
        } else {
            SnapStartApplyOn::None
        })
        .build()
}

/// The capacity provider to run on, when one is configured.
pub(super) fn capacity_provider(o: &LambdaOptions) -> Option<CapacityProviderConfig> {
    let arn = o.capacity_provider_arn.as_ref()?;
    let mi = LambdaManagedInstancesCapacityProviderConfig::builder()
        .capacity_provider_arn(arn)
        .set_per_execution_environment_max_concurrency(o.max_concurrency)
        .build()
        .ok()?;
    Some(
        CapacityProviderConfig::builder()
            .lambda_managed_instances_capacity_provider_config(mi)
            .build(),
    )
}

/// Whether `c` already has the fast-path settings.
pub(super) fn matches(o: &LambdaOptions, c: &FunctionConfiguration) -> bool {
    let snap_on = c
        .snap_start()
        .and_then(|s| s.apply_on())
        .is_some_and(|a| *a == SnapStartApplyOn::PublishedVersions);
    snap_on == o.snap_start
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: LambdaOptions,
    }

    fn options(args: &[&str]) -> LambdaOptions {
        Cli::try_parse_from(std::iter::once("sri").chain(args.iter().copied()))
            .expect("valid flags")
            .o
    }

    #[test]
    fn refusals_name_the_setting_to_change() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--lambda-snapstart", "true", "--lambda-python", "3.11"],
                "SRI_LAMBDA_PYTHON=3.12",
            ),
            (
                &["--lambda-max-concurrency", "8"],
                "SRI_LAMBDA_CAPACITY_PROVIDER_ARN",
            ),
            (
                &[
                    "--lambda-capacity-provider-arn",
                    "arn:aws:lambda:us-east-1:1:capacity-provider:p",
                    "--lambda-python",
                    "3.12",
                ],
                "SRI_LAMBDA_PYTHON=3.13",
            ),
            (
                &[
                    "--lambda-capacity-provider-arn",
                    "arn:aws:lambda:us-east-1:1:capacity-provider:p",
                    "--lambda-python",
                    "3.13",
                    "--lambda-snapstart",
                    "true",
                ],
                "unset one of them",
            ),
        ];
        for (args, needle) in cases {
            let err = check(&options(args)).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert!(check(&options(&[])).is_ok());
        assert!(check(&options(&["--lambda-snapstart", "true"])).is_ok());
    }

    #[test]
    fn a_capacity_provider_maps_onto_the_function_configuration() {
        let o = options(&[
            "--lambda-capacity-provider-arn",
            "arn:aws:lambda:us-east-1:1:capacity-provider:p",
            "--lambda-python",
            "3.13",
            "--lambda-max-concurrency",
            "32",
        ]);
        check(&o).unwrap();
        let c = capacity_provider(&o).expect("a capacity provider");
        let mi = c
            .lambda_managed_instances_capacity_provider_config()
            .unwrap();
        assert_eq!(
            mi.capacity_provider_arn(),
            "arn:aws:lambda:us-east-1:1:capacity-provider:p"
        );
        assert_eq!(mi.per_execution_environment_max_concurrency(), Some(32));
        assert!(capacity_provider(&options(&[])).is_none());
        assert_eq!(
            snap_start(&options(&["--lambda-snapstart", "true"])).apply_on(),
            Some(&SnapStartApplyOn::PublishedVersions)
        );
        assert_eq!(
            snap_start(&options(&[])).apply_on(),
            Some(&SnapStartApplyOn::None)
        );
    }
}

//! Removing deployments: one version (moving `live` off it first), a whole function when its last
//! version goes, and the garbage collection that keeps the newest few per plugin (and deletes
//! the SDK layer versions no function uses any more, see `layers`).

use super::errors::{aws_err, is_not_found};
use super::{Deployed, LIVE_ALIAS, LambdaBackend};
use crate::Error;

impl LambdaBackend {
    /// Deletes leftovers and deployments beyond the `keep` newest per function (never `live`).
    pub(super) async fn collect(&self, keep: usize) -> Result<Vec<String>, Error> {
        let mut removed = Vec::new();
        for f in self.managed_functions().await? {
            let Some(aws_name) = f.function_name().map(str::to_owned) else {
                continue;
            };
            let lock = self.lock_for(&aws_name);
            let _guard = lock.lock().await;
            self.refresh(&aws_name).await?;
            let mut mine: Vec<Deployed> = self
                .deployed
                .lock()
                .expect("lock")
                .values()
                .filter(|d| d.aws_name == aws_name)
                .cloned()
                .collect();
            if mine.is_empty() {
                // A function with no deployment of ours: a deploy that never published.
                match self
                    .lambda
                    .delete_function()
                    .function_name(&aws_name)
                    .send()
                    .await
                {
                    Ok(_) => removed.push(aws_name.clone()),
                    Err(e) if e.as_service_error().is_some_and(is_not_found) => {}
                    Err(e) => return Err(aws_err(format!("DeleteFunction {aws_name}"), &e)),
                }
                self.live.lock().expect("lock").remove(&aws_name);
                continue;
            }
            mine.sort_by_key(|d| std::cmp::Reverse(d.version.parse::<u64>().unwrap_or(0)));
            let live = self
                .live
                .lock()
                .expect("lock")
                .get(&aws_name)
                .and_then(|l| l.version.clone());
            for d in mine.iter().skip(keep.max(1)) {
                if live.as_deref() == Some(d.version.as_str()) {
                    continue;
                }
                self.delete_deployment(d).await?;
                removed.push(d.function.name.clone());
            }
        }
        removed.extend(self.collect_layers().await?);
        Ok(removed)
    }

    /// Deletes one version; if it was live, moves `live` to the newest remaining one, and
    /// deletes the whole function when none remains.
    pub(super) async fn delete_deployment(&self, d: &Deployed) -> Result<(), Error> {
        let aws_name = &d.aws_name;
        let remaining: Vec<Deployed> = self
            .deployed
            .lock()
            .expect("lock")
            .values()
            .filter(|o| o.aws_name == *aws_name && o.version != d.version)
            .cloned()
            .collect();
        if remaining.is_empty() {
            match self
                .lambda
                .delete_function()
                .function_name(aws_name)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if e.as_service_error().is_some_and(is_not_found) => {}
                Err(e) => return Err(aws_err(format!("DeleteFunction {aws_name}"), &e)),
            }
            self.live.lock().expect("lock").remove(aws_name);
        } else {
            let live = self.live.lock().expect("lock").get(aws_name).cloned();
            if live.as_ref().and_then(|l| l.version.as_deref()) == Some(d.version.as_str()) {
                let newest = remaining
                    .iter()
                    .max_by_key(|o| o.version.parse::<u64>().unwrap_or(0))
                    .expect("not empty");
                self.lambda
                    .update_alias()
                    .function_name(aws_name)
                    .name(LIVE_ALIAS)
                    .function_version(&newest.version)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("UpdateAlias {aws_name}:{LIVE_ALIAS}"), &e))?;
                if let Some(l) = self.live.lock().expect("lock").get_mut(aws_name) {
                    l.version = Some(newest.version.clone());
                    l.asked = std::time::Instant::now();
                }
            }
            match self
                .lambda
                .delete_function()
                .function_name(aws_name)
                .qualifier(&d.version)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if e.as_service_error().is_some_and(is_not_found) => {}
                Err(e) => {
                    return Err(aws_err(
                        format!("DeleteFunction {aws_name}:{}", d.version),
                        &e,
                    ));
                }
            }
        }
        self.deployed.lock().expect("lock").remove(&d.function.name);
        Ok(())
    }
}

#!/usr/bin/env python3
"""Transform an AWS SAM template into plain CloudFormation JSON, offline.

cfn-lint (>= 1.54) and checkov no longer expand `AWS::Serverless::*` themselves, so mistakes
inside them (a bad `InvokeMode`, a 1200 s timeout, a misspelled IAM action) pass unseen unless
the template is transformed first. `sam validate`/`sam build` would do it, but they need an AWS
region, credentials for managed-policy lookups and a CLI that cannot share a venv with checkov.
This does what they do with aws-sam-translator alone:

- local `CodeUri`/`ContentUri` paths (what `sam build`/`sam package` upload) become dummy
  `s3://` URIs, the only form the translator accepts;
- managed-policy names are never looked up (the stack passes ARNs, never bare names);
- the region is a dummy unless `AWS_DEFAULT_REGION` is set.

Usage: sam_translate.py TEMPLATE.yaml OUT.json
"""

import json
import os
import sys

# Before samtranslator is imported: it asks boto3 for the partition of the current region.
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from samtranslator.model.exceptions import InvalidDocumentException  # noqa: E402
from samtranslator.translator.transform import transform  # noqa: E402
from samtranslator.yaml_helper import yaml_parse  # noqa: E402

# Properties holding a path that `sam package` would upload, per resource type.
LOCAL_URIS = {
    "AWS::Serverless::Function": "CodeUri",
    "AWS::Serverless::LayerVersion": "ContentUri",
    "AWS::Serverless::Api": "DefinitionUri",
    "AWS::Serverless::HttpApi": "DefinitionUri",
    "AWS::Serverless::StateMachine": "DefinitionUri",
}


class NoManagedPolicyLookup:
    """Stands in for ManagedPolicyLoader: the templates linted here name no managed policy."""

    def load(self):
        return {}


def dummy_s3(template):
    for name, resource in (template.get("Resources") or {}).items():
        if not isinstance(resource, dict):
            continue
        prop = LOCAL_URIS.get(resource.get("Type"))
        props = resource.get("Properties")
        if not prop or not isinstance(props, dict):
            continue
        value = props.get(prop)
        if isinstance(value, str) and not value.startswith("s3://"):
            props[prop] = f"s3://sri-lint-dummy-bucket/{name}.zip"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as f:
        template = yaml_parse(f.read())
    dummy_s3(template)
    try:
        transformed = transform(template, {}, NoManagedPolicyLookup())
    except InvalidDocumentException as e:
        # Say every reason the translator found, not just "invalid document".
        reasons = "\n".join(f"  - {err.message}" for err in e.causes)
        sys.exit(f"{src}: the SAM transform failed:\n{reasons}")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(transformed, f, indent=1, sort_keys=False)
        f.write("\n")


if __name__ == "__main__":
    main()

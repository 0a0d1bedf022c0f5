from typing import Any

from dify_plugin import ToolProvider
from dify_plugin.errors.tool import ToolProviderCredentialValidationError

DEMO_KEY = "sri-demo-key"


class SampleProvider(ToolProvider):
    def _validate_credentials(self, credentials: dict[str, Any]) -> None:
        api_key = credentials.get("api_key")
        if not api_key:
            raise ToolProviderCredentialValidationError("api_key is required")
        if api_key != DEMO_KEY:
            raise ToolProviderCredentialValidationError(
                "invalid api_key: the sample plugin only accepts the demo key"
            )

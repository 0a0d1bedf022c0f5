from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class WhoamiTool(Tool):
    """Reports whether the api_key credential is set. Never echoes the key itself."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        del tool_parameters
        credentials = self.runtime.credentials or {}
        if credentials.get("api_key"):
            yield self.create_text_message("api_key credential is set")
        else:
            yield self.create_text_message("api_key credential is not set")

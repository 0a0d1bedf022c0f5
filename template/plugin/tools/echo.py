import json
from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class EchoTool(Tool):
    """Returns all tool parameters: one JSON message, then one text message."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        yield self.create_json_message(dict(tool_parameters))
        yield self.create_text_message(json.dumps(tool_parameters, sort_keys=True, ensure_ascii=False))

import time
from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


def _int(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    return int(float(value))


class StreamTool(Tool):
    """Yields n text messages "<prefix> 0".."<prefix> n-1", sleeping delay_ms between them."""

    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        n = _int(tool_parameters.get("n"), 3)
        delay = _int(tool_parameters.get("delay_ms"), 100) / 1000
        prefix = tool_parameters.get("prefix") or "chunk"
        for i in range(n):
            if i > 0:
                time.sleep(delay)
            yield self.create_text_message(f"{prefix} {i}")

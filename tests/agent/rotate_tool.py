"""User tools for the tool-registry tests, loaded as ``tests.agent.rotate_tool:Rotate`` the way a
user's own module would be (``--tools reflect,confirm,mypkg.mod:Rotate``): nothing in agent/,
train/, analysis/ or apps/ names them."""

from __future__ import annotations

from agent.tools import ToolImage, ToolResult, ToolState, is_index


class Rotate:
    """Rotate image k by 90 degrees counter-clockwise (OpenAI-style JSON-schema parameters)."""

    name = "rotate"
    schema = {
        "name": "rotate",
        "description": "Rotate one image by 90 degrees.",
        "parameters": {
            "type": "object",
            "properties": {"image": {"type": "integer", "description": "image number"}},
            "required": ["image"],
        },
    }

    def run(self, arguments: dict, state: ToolState) -> ToolResult:
        k = arguments.get("image")
        if not is_index(k) or not 1 <= k <= len(state.images):
            return ToolResult(self.name, arguments, False, f"Error: no image {k!r}")
        rotated = state.images[k - 1].rotate(90, expand=True)
        text = f"Here is Image {k} rotated."
        return ToolResult(self.name, arguments, True, text, [ToolImage(rotated, k)])


class Broken:
    """A buggy user tool: raises on ``{"image": 1}``, else returns a malformed result."""

    name = "broken"
    schema = {"name": "broken", "description": "Always fails.", "arguments": {}}

    def run(self, arguments: dict, state: ToolState) -> ToolResult:
        if arguments.get("image") == 1:
            raise RuntimeError("bug")
        bad = ToolImage(state.images[0], source=99)  # an input image that does not exist
        return ToolResult(self.name, arguments, True, "ok", [bad])

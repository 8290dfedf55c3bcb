"""encoder_decoder: the orchestrating operator of the hello world.

It sends the input to ``encoder``, hands the encoder's output to ``decoder`` by
reference (the bytes go encoder -> decoder directly) and answers with the
decoder's output, again by reference (the caller pulls it from the decoder).
Large tensors never pass through this process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tdist.operators import Operator, Request


class EncodeDecode(Operator):
    pull_inputs = False

    async def execute(self, request: Request) -> Mapping[str, Any]:
        params = {k: request.parameters[k] for k in ("input_copies", "delay") if k in request.parameters}
        encoder = request.operator(str(self.parameters.get("encoder", "encoder")))
        decoder = request.operator(str(self.parameters.get("decoder", "decoder")))
        encoded = await encoder.infer({"input": request.input("input")}, parameters=params, pull_outputs=False)
        decoded = await decoder.infer(
            {"input": encoded.outputs["output"], "input_copies": encoded.outputs["input_copies"]},
            parameters={k: v for k, v in params.items() if k == "delay"},
            pull_outputs=False,
        )
        return {"output": decoded.outputs["output"]}

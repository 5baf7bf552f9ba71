//! Weight files: safetensors through mmap, the torch-zip converter, name maps.

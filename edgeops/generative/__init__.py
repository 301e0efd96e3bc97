"""Text generation: tokenizers and texts, the decoder's evaluation on the build host, its runtime configs."""

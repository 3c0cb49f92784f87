"""The two judges evaluate.py scores audio with: a miniature CLAP trained here (clap) and the
pretrained aisfx embedding (judge, optional). Neither is part of the method."""

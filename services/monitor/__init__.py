"""The monitor: live health per serving version, accuracy on late labels, input drift (Faust)."""

"""Generated from ztagent/xds/proto by scripts/gen-protos.sh; do not edit."""

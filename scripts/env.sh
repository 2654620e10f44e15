# Shared locations for cdl's scripts (sourced, not run). Everything cdl installs
# lives under $CDL_HOME, outside the checkout, so a second set-up is fast.
export CDL_HOME="${CDL_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cdl}"
export CDL_VENV="${CDL_VENV:-$CDL_HOME/venv}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$CDL_HOME/uv}"
export UV_PROJECT_ENVIRONMENT="$CDL_VENV"
export CDL_KAFKA_VERSION="${CDL_KAFKA_VERSION:-4.1.1}"
export CDL_MINIO_VERSION="${CDL_MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
export PATH="$CDL_HOME/bin:$PATH"
# Imports keep their compiled bytecode (set-up compiles the environment's packages): with
# PYTHONDONTWRITEBYTECODE from the shell, every process -- each service, CLI call and test worker --
# would compile what it imports from source again (torch alone: seconds of CPU each time).
unset PYTHONDONTWRITEBYTECODE

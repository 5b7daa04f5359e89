"""install-cni: put the meshcni plugin on a node and keep it chained after the primary CNI.

The DaemonSet's install container (and an operator on a plain host) runs `meshcni install-cni`, which copies
the plugin bundle into the CNI bin dir, appends `{"type": "meshcni"}` as the last plugin of the primary network
config, re-inserts it whenever the primary CNI rewrites its file, and on uninstall (or SIGTERM) takes out only
what it put in. `Installer` is the entry point; the other modules are its parts (config rules, file operations
that never lose a concurrent writer's bytes, the plugin bundle, the state record, the directory watcher).
"""

from meshcni.install.errors import InstallError, InvalidConfig, PluginSourceError
from meshcni.install.installer import Installer, InstallOptions

__all__ = ["Installer", "InstallOptions", "InstallError", "InvalidConfig", "PluginSourceError"]

# What module.nix writes, as plain attribute sets: config.yml, the profiles, and the systemd
# service's settings that mirror deploy/systemd/model-proxy.service. Builtins only (no nixpkgs),
# so tests/test_deploy.py evaluates it with `nix-instantiate --eval` alone and loads the result
# with the proxy's own load_config.
let
  # The keys module.nix sets from its own options; settings may not set them a second time.
  owned = {
    host = "host";
    port = "port";
    state_dir = "stateDir";
    profiles_dir = "profiles";
    api_tokens = "apiTokensFile";
    tabby_dir = "tabbyPackage";
  };
  clashes = settings: builtins.filter (key: builtins.hasAttr key settings) (builtins.attrNames owned);
  # The proxy's defaults for the two keys that decide how long a stop takes (proxy/settings.py).
  drainTimeout = settings: settings.drain_timeout or 30;
  stopGrace = settings: settings.stop_grace or 10;
in
{
  # config.yml: TabbyAPI's sections (tabbyConfig) at the top, the proxy's under `proxy:`.
  config =
    { host, port, stateDir, profilesDir, apiTokensFile ? null, tabbyDir ? null, settings ? { }, tabbyConfig ? { } }:
    let
      clash = clashes settings;
      first = builtins.head clash;
    in
    if clash != [ ] then
      throw "services.model-proxy.settings.${first}: set services.model-proxy.${owned.${first}} instead"
    else if tabbyConfig ? proxy then
      throw "services.model-proxy.tabbyConfig.proxy: the proxy's keys go in services.model-proxy.settings"
    else
      tabbyConfig // {
        proxy = settings // {
          inherit host port;
          state_dir = stateDir;
          profiles_dir = profilesDir;
          # Without a secret file the proxy creates one with random keys in its state folder.
          api_tokens = if apiTokensFile == null then "${stateDir}/api_tokens.yml" else apiTokensFile;
        } // (if tabbyDir == null then { } else { tabby_dir = tabbyDir; });
      };

  # model_configs/: profile name -> file name and content.
  profileFiles = profiles:
    builtins.listToAttrs (map (name: { name = "${name}.yml"; value = profiles.${name}; }) (builtins.attrNames profiles));

  # Longer than a drain and a backend's stop together, and never below the unit file's 60 s.
  timeoutStopSec = settings:
    let needed = builtins.ceil (drainTimeout settings + stopGrace settings) + 20;
    in if needed > 60 then needed else 60;

  # deploy/systemd/model-proxy.service's [Unit] and [Service], less what names a path (ExecStart,
  # ExecReload: NixOS has no /bin/kill; WorkingDirectory, the state folder) and the stop timeout,
  # which module.nix adds. The comments in the unit file say why each is set.
  unitConfig = {
    StartLimitIntervalSec = 300;
    StartLimitBurst = 5;
  };
  serviceConfig = {
    Type = "simple";
    DynamicUser = false;
    User = "model-proxy";
    Group = "model-proxy";
    SupplementaryGroups = [ "video" "render" ];
    KillMode = "mixed";
    KillSignal = "SIGTERM";
    Restart = "on-failure";
    RestartSec = 5;
    RestartPreventExitStatus = 2;
    StateDirectoryMode = "0750";
    UMask = "0077";
    LimitNOFILE = 65536;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RestrictNamespaces = true;
    LockPersonality = true;
    PrivateMounts = true;
    ProtectProc = "invisible";
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "~@clock @cpu-emulation @debug @module @mount @obsolete @raw-io @reboot @swap" ];
    SystemCallErrorNumber = "EPERM";
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
    DevicePolicy = "closed";
    DeviceAllow = [
      "char-nvidiactl rw"
      "char-nvidia-frontend rw"
      "char-nvidia-uvm rw"
      "char-nvidia-caps rw"
      "char-drm rw"
    ];
  };
}

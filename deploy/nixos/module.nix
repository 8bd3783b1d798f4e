# NixOS module for model-proxy: services.model-proxy.*. Import it in configuration.nix:
#   imports = [ /path/to/model-proxy/deploy/nixos/module.nix ];
#   services.model-proxy = {
#     enable = true;
#     package = pkgs.callPackage ./model-proxy.nix { };   # your derivation, see `package` below
#     settings.unload_timer = "10m";
#     profiles.qwen = { backend = "tabbyapi"; model.model_name = "Qwen3-8B-exl3"; };
#     apiTokensFile = "/run/secrets/model-proxy-tokens.yml";
#   };
# The service mirrors deploy/systemd/model-proxy.service (the reasons for each setting are there);
# render.nix turns the options into config.yml and the profiles.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.model-proxy;
  render = import ./render.nix;
  yaml = pkgs.formats.yaml { };

  configFile = yaml.generate "model-proxy-config.yml" (render.config {
    inherit (cfg) host port stateDir apiTokensFile settings tabbyConfig;
    # The paths below /etc, not the store paths they link to: a rebuild then changes what they
    # point at, and the running proxy picks the change up on the reload it triggers.
    profilesDir = "/etc/model-proxy/model_configs";
    tabbyDir = if cfg.tabbyPackage == null then null else "${cfg.tabbyPackage}";
  });
  profilesDir = pkgs.linkFarm "model-proxy-profiles" (lib.mapAttrsToList
    (file: profile: { name = file; path = yaml.generate file profile; })
    (render.profileFiles cfg.profiles));
  stateUnderVarLib = lib.hasPrefix "/var/lib/" cfg.stateDir;
in
{
  options.services.model-proxy = {
    enable = lib.mkEnableOption "model-proxy, a model-swapping proxy for local LLM servers";

    package = lib.mkOption {
      type = lib.types.package;
      description = ''
        The proxy: a derivation whose `bin/model-proxy` runs proxy.py with a Python that has
        requirements.txt installed (a `python3.withPackages` wrapper, for example).
      '';
    };

    tabbyPackage = lib.mkOption {
      type = lib.types.nullOr lib.types.package;
      default = null;
      description = ''
        TabbyAPI, for `backend: tabbyapi` profiles: a derivation holding TabbyAPI's checkout
        (`main.py` at its top), used as `proxy.tabby_dir`. The proxy runs its `venv/bin/python`
        when there is one; otherwise set `settings.tabby_python`. The store is read-only, so keep
        `settings.tabby_auth` at its default, off (keys would be written there). Null: no TabbyAPI.
      '';
    };

    host = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1";
      description = "Address to listen on. Keep loopback and put a TLS reverse proxy in front to expose it.";
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 9000;
      description = "Port to listen on.";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/model-proxy";
      description = "Backend logs, generated TabbyAPI configs, the request log, and the keys when apiTokensFile is null.";
    };

    apiTokensFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/model-proxy-tokens.yml";
      description = ''
        The key file (TabbyAPI's format, README "Auth"), readable by the model-proxy user. A path
        as a string, outside the Nix store, which every user can read: a secret manager's file
        (agenix, sops-nix). Null: the proxy creates one with random keys in stateDir.
      '';
    };

    settings = lib.mkOption {
      inherit (yaml) type;
      default = { };
      example = { unload_timer = "10m"; max_loaded_models = 2; drain_timeout = 60; };
      description = ''
        The `proxy:` section of config.yml (README, Configuration), less host, port, state_dir,
        profiles_dir, api_tokens and tabby_dir, which the options above set.
      '';
    };

    tabbyConfig = lib.mkOption {
      inherit (yaml) type;
      default = { };
      example = { model = { model_dir = "/srv/models"; cache_mode = "Q8"; }; };
      description = "TabbyAPI's sections of config.yml (model, network, ...), the base of every tabbyapi profile.";
    };

    profiles = lib.mkOption {
      type = lib.types.attrsOf yaml.type;
      default = { };
      example = {
        qwen = { backend = "tabbyapi"; default = true; model = { model_name = "Qwen3-8B-exl3"; }; };
      };
      description = "Model profiles by name, each written to model_configs/<name>.yml (README, Profiles).";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the port in the firewall. Only useful with host set to a non-loopback address.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.apiTokensFile == null || !lib.hasPrefix builtins.storeDir cfg.apiTokensFile;
        message = "services.model-proxy.apiTokensFile must not be in the Nix store, which every user can read";
      }
      {
        assertion = !(cfg.settings.disable_auth or false) || cfg.host == "127.0.0.1" || cfg.host == "::1";
        message = "services.model-proxy: settings.disable_auth = true with a non-loopback host leaves the API open";
      }
    ];

    users.users.model-proxy = {
      isSystemUser = true;
      group = "model-proxy";
      home = cfg.stateDir;
      description = "model-proxy";
    };
    users.groups.model-proxy = { };

    environment.etc."model-proxy/config.yml".source = configFile;
    environment.etc."model-proxy/model_configs".source = profilesDir;

    # A state folder outside /var/lib cannot be a StateDirectory=; create it here instead.
    systemd.tmpfiles.rules = lib.optional (!stateUnderVarLib) "d ${cfg.stateDir} 0750 model-proxy model-proxy - -";

    networking.firewall.allowedTCPPorts = lib.optional cfg.openFirewall cfg.port;

    systemd.services.model-proxy = {
      description = "model-proxy: a model-swapping proxy for local LLM servers";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      # A rebuild that changes only the config or the profiles reloads (SIGHUP) instead of
      # restarting, so loaded models keep running. Keys that need a restart (README, Reloading)
      # then need `systemctl restart model-proxy`; host and port are on the command line, so a
      # change to them restarts the service.
      reloadTriggers = [ configFile profilesDir ];
      unitConfig = render.unitConfig;
      serviceConfig = render.serviceConfig // {
        ExecStart = lib.escapeShellArgs [
          "${cfg.package}/bin/model-proxy"
          "--config" "/etc/model-proxy/config.yml"
          "--host" cfg.host
          "--port" (toString cfg.port)
        ];
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        WorkingDirectory = cfg.stateDir;
        ReadWritePaths = [ cfg.stateDir ];
        TimeoutStopSec = render.timeoutStopSec cfg.settings;
      } // lib.optionalAttrs stateUnderVarLib {
        StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
      };
    };
  };
}

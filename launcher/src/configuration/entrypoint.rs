//! The worker's command line, as torchrun's `config_from_args` builds it: `python -u script`,
//! `python -u -m module`, a program with `--no-python`, `runpy.run_path` with `--run-path`, and
//! the legacy launcher's `--local-rank=<n>`.

use std::ffi::OsString;

use crate::configuration::cli::{Args, Flavor};
use crate::configuration::config::{is_executable, ConfigError, Environment};

/// Replaced by the worker's local rank in the script's arguments (torchrun's macro).
pub const LOCAL_RANK_MACRO: &str = "${local_rank}";

/// The worker command line (torchrun's `config_from_args`), and the script's name.
pub(crate) fn build_command(
    flavor: Flavor,
    args: &Args,
    env: &dyn Environment,
) -> Result<(Vec<OsString>, String), ConfigError> {
    if args.module && args.no_python {
        return Err(ConfigError::Conflict(
            "-m/--module and --no-python exclude each other: -m runs a Python module, --no-python runs a program",
        ));
    }
    if flavor == Flavor::LegacyLaunch && args.no_python && !args.use_env {
        return Err(ConfigError::Conflict(
            "ferrun launch --no-python needs --use-env: a program that is not Python cannot be handed --local-rank",
        ));
    }
    let script = args.training_script();
    let mut command: Vec<String> = Vec::new();
    if args.run_path {
        command.push(python(env)?);
        command.extend(["-u".into(), "-c".into(), RUN_PATH_SHIM.into()]);
        command.push(checked_script(&script, env)?);
    } else if args.no_python {
        let program = if script.contains('/') {
            is_executable(&env.cwd().join(&script)).then(|| script.clone())
        } else {
            env.which(&script).map(|p| p.display().to_string())
        };
        command.push(program.ok_or_else(|| ConfigError::ProgramMissing {
            what: "--no-python program",
            name: script.clone(),
            hint: "give a path to an executable file, or a program on PATH",
        })?);
    } else {
        command.push(python(env)?);
        command.push("-u".into());
        if args.module {
            command.extend(["-m".into(), script.clone()]);
        } else {
            command.push(checked_script(&script, env)?);
        }
    }
    // torch.distributed.launch puts --local-rank before the script's own arguments.
    if flavor == Flavor::LegacyLaunch && !args.use_env {
        command.push(format!("--local-rank={}", LOCAL_RANK_MACRO));
    }
    let mut command: Vec<OsString> = command.into_iter().map(OsString::from).collect();
    command.extend(args.training_script_args().iter().cloned());
    Ok((command, script))
}

/// Most modules `--warm-start-import` may list.
const MAX_WARM_MODULES: usize = 64;

/// The modules `--warm-start` interpreters import: torch, then `--warm-start-import`'s;
/// `None` without `--warm-start`.
pub(crate) fn warm_modules(args: &Args) -> Result<Option<Vec<String>>, ConfigError> {
    if !args.warm_start {
        if !args.warm_start_import.is_empty() {
            return Err(ConfigError::WarmStart(
                "--warm-start-import lists modules for --warm-start, which is off; add --warm-start".into(),
            ));
        }
        return Ok(None);
    }
    if args.no_python {
        return Err(ConfigError::WarmStart(
            "it pre-starts Python interpreters; a --no-python program cannot use them (drop one of the two)".into(),
        ));
    }
    let identifier = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut modules = vec!["torch".to_owned()];
    for name in args
        .warm_start_import
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        if !name.split('.').all(identifier) {
            return Err(ConfigError::WarmStart(format!(
                "--warm-start-import {name:?} is not a module name (dotted Python identifiers, e.g. numpy,transformers.models)"
            )));
        }
        if !modules.iter().any(|m| m == name) {
            modules.push(name.to_owned());
        }
    }
    if modules.len() > MAX_WARM_MODULES {
        return Err(ConfigError::WarmStart(format!(
            "--warm-start-import lists {} modules; at most {MAX_WARM_MODULES}",
            modules.len() - 1
        )));
    }
    Ok(Some(modules))
}

/// torchrun's `--run-path`: run the script with `runpy.run_path` as `__main__`.
const RUN_PATH_SHIM: &str =
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')";

fn python(env: &dyn Environment) -> Result<String, ConfigError> {
    if let Some(exec) = env.var("PYTHON_EXEC").filter(|s| !s.is_empty()) {
        return Ok(exec);
    }
    ["python3", "python"]
        .into_iter()
        .find_map(|p| env.which(p))
        .map(|p| p.display().to_string())
        .ok_or_else(|| ConfigError::ProgramMissing {
            what: "Python interpreter",
            name: "python3".into(),
            hint: "put python3 on PATH, set PYTHON_EXEC, or use --no-python for other programs",
        })
}

fn checked_script(script: &str, env: &dyn Environment) -> Result<String, ConfigError> {
    let cwd = env.cwd();
    if cwd.join(script).is_file() {
        Ok(script.to_owned())
    } else {
        Err(ConfigError::ScriptMissing {
            path: script.to_owned(),
            cwd: cwd.display().to_string(),
        })
    }
}

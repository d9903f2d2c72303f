#!/usr/bin/env bash
# One lent GPU machine, one call (issue 29): everything it measures lands in $OUT the moment it exists, and the
# script stops itself before the lease does. In order:
#   step    the 128^3 AMP training step, full model and baseline, eager and the opt-in compiled path, interleaved,
#           with peak GPU memory (benchmarks/train_step.py -> step.json, step.log);
#   loader  the bundle's training loader wait over 2 real epochs at full BraTS size (benchmarks/train_epoch.py, 20
#           synthetic 240x240x155 cases -> epoch.json, loader.log);
#   study   the real-anatomy 3-D study, studies/anatomy_3d/README.md (settings baseline, dmaf, full; seeds SEEDS),
#           every run at once on the one GPU through `dmaf ablation`; each run's record is packed into study.tgz as
#           soon as it is written (study.log holds the runner's progress).
# machine.txt (GPU, driver, torch/CUDA, CPU model, cores) is written first; lease.log has one line per step of the
# script (start, limit and exit of each section, what was packed) and, last, the line naming the sections skipped
# for lack of time. $OUT comes back with at most 8 files, so these are the only names written there: machine.txt,
# lease.log, step.log, step.json, loader.log, epoch.json, study.log, study.tgz.
#
# On the lent machine (torch there, MONAI not; no network): run benchmarks/lease_wheels.sh here first, then call the
# device tool from the repository root with
#   carry: ["lease_wheels"]     timeout_s: 600
#   command: CODE_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_lease.sh
# The wheels in lease_wheels/ are installed with pip --no-index --no-deps into /tmp/lease_site, the package itself is
# used from the checkout (PYTHONPATH), and the imports are checked before anything runs.
#
# Environment:
#   OUT          where the results go (set by the device tool; default: lease_out)
#   LEASE_S      seconds this script may take in all (default 540: a 15-minute lease less the machine's start and
#                the transfers); MARGIN_S (default 20) of them are kept free. Each section runs under `timeout` with
#                the smaller of its cap and the time left, and is skipped when less than it needs is left.
#   SECTIONS     which sections to run (default "step loader study"), e.g. SECTIONS=study for a lease of seeds only
#   SEEDS        the study's seeds on this lease (default [0,1]); JOBS the runs at once (default: all of them);
#                STUDY_SETTINGS the settings (default baseline,dmaf,full)
#   STEP_CAP_S, LOADER_CAP_S  the sections' caps (defaults 150 and 75 s); the study gets what is left
#   TEMPLATE_DIR the MNI templates (default lease_wheels/mni, else nilearn's)
#   WORK         where data and the study folder go (default: data/ and studies/ of the checkout)
#   CODE_COMMIT  the commit the working tree was sent from, for machine.txt (the copy there has no git)
#   DRY_RUN=1    the CPU dry run (tests/test_gpu_lease.py): device cpu, no AMP, no pip install, one thread per
#                process; 32^3 steps (the smallest the network trains on: its fifth level is 2^3), tiny data and
#                network, 1 epoch, 1 seed, the baseline alone, under a scratch WORK; LEASE_S 3600, MARGIN_S 5. The
#                study falls back to the demo profile when no template is found.
#   PYTHON       the interpreter (default python3)
set -u
cd "$(dirname "$0")/.."
root=$PWD
SECONDS=0  # bash's clock: seconds since this line

dry=${DRY_RUN:-0}
out=${OUT:-lease_out}
mkdir -p "$out" && out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
lease_s=${LEASE_S:-540}
sections=" ${SECTIONS:-step loader study} "
export PYTHONUNBUFFERED=1

# ------------------------------------------------------------------ sizes: the lease's, or the dry run's
if [ "$dry" = 1 ]; then
  # the network of the bundle's own tests (4 levels, 1 attention layer) wherever the command takes overrides: the
  # dry run checks the plumbing, not the model, on 2 busy cores
  tiny=(--channels "[4,8,16,32]" --num_layers 1 --num_heads 2)
  # one thread per process: on busy cores, two threads that wait for each other make a 32^3 step 3-10x slower
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # caps far above the minute a dry run takes on 2 cores (on cores starved by other work it can take many), and needs
  # that are not estimates: any LEASE_S up to 1500 runs the step section alone, however long it took (the skip
  # test of tests/test_gpu_lease.py)
  lease_s=${LEASE_S:-3600}
  margin=${MARGIN_S:-5}
  work=${WORK:-$(mktemp -d /tmp/gpu_lease_dry.XXXXXX)}
  device=cpu amp=()
  step_size=32 step_paths=${STEP_PATHS:-eager} step_rounds=1 step_steps=1
  step_need=10 step_cap=${STEP_CAP_S:-1500}
  loader_args=(--cases 2 --shape 24 24 16 --gen-workers 1 "roi_size=[16,16,16]" "num_workers=0" "channels=[4,8,16,32]"
               "num_layers=1" "num_heads=2")
  loader_need=1490 loader_cap=${LOADER_CAP_S:-1500}
  study_cases=4 study_split=2,1,1 study_spacing=4 study_shape=16,16,16 gen_workers=1
  settings=${STUDY_SETTINGS:-baseline}  # one run: each bundle process costs seconds of imports
  seeds=${SEEDS:-[0]}
  study_overrides=(--roi_size "[16,16,16]" --batch_size 1 --epochs 1 --val_interval 1 --learning_rate 0.001
                   --num_workers 0 --cache_rate 1.0 --sw_batch_size 4 --patch_sampling uniform "${tiny[@]}")
  study_need=1490
else
  margin=${MARGIN_S:-20}
  work=${WORK:-}
  device=cuda amp=(--amp)
  step_size=128 step_paths=${STEP_PATHS:-eager compiled} step_rounds=2 step_steps=5
  step_need=60 step_cap=${STEP_CAP_S:-150}
  loader_args=(--cases 20 --epochs 2 --gen-workers 16)
  loader_need=45 loader_cap=${LOADER_CAP_S:-75}
  # studies/anatomy_3d/README.md, "Data" and "Budget": fixed before any run
  study_cases=40 study_split=24,8,8 study_spacing=2 study_shape="" gen_workers=16
  settings=${STUDY_SETTINGS:-baseline,dmaf,full}
  seeds=${SEEDS:-[0,1]}
  study_overrides=(--roi_size "[64,64,64]" --batch_size 1 --epochs 10 --val_interval 5 --learning_rate 0.001
                   --num_workers 2 --cache_rate 1.0 --sw_batch_size 4 --patch_sampling uniform)
  study_need=180
fi
if [ -n "$work" ]; then
  mkdir -p "$work" && work=$(cd "$work" && pwd)
  epoch_data=$work/epoch_bench study_data=$work/anatomy_brats study_dir=$work/anatomy_3d
else
  epoch_data=$root/data/epoch_bench study_data=$root/data/anatomy_brats study_dir=$root/studies/anatomy_3d
fi

# ------------------------------------------------------------------ helpers
log=$out/lease.log
note() { echo "[+${SECONDS}s] $*" | tee -a "$log"; }
left() { echo $((lease_s - margin - SECONDS)); }  # seconds left before the margin
skipped=()

# section NAME NEED CAP FUNCTION: FUNCTION LIMIT, LIMIT the smaller of CAP and the time left; skipped (and named in
# the last line of lease.log) when less than NEED seconds are left
section() {
  local name=$1 need=$2 cap=$3 fn=$4 l limit rc start
  case "$sections" in *" $name "*) ;; *) note "section $name: not asked for (SECTIONS)"; return 0 ;; esac
  l=$(left)
  if [ "$l" -lt "$need" ]; then
    skipped+=("$name")
    note "section $name: SKIPPED for lack of time ($l s left, it needs $need)"
    return 0
  fi
  limit=$((l < cap ? l : cap))
  start=$SECONDS
  note "section $name: start, time limit $limit s"
  "$fn" "$limit"
  rc=$?
  case $rc in 124 | 137) rc="$rc (stopped at its time limit)" ;; esac
  note "section $name: exit $rc after $((SECONDS - start)) s"
}

finish() {
  note "sections skipped for lack of time: ${skipped[*]:-none}"
  note "done in $SECONDS s of LEASE_S $lease_s; in $out: $(cd "$out" && ls | tr '\n' ' ')"
}

# ------------------------------------------------------------------ machine.txt, first
{
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)  code ${CODE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "dry run $dry, LEASE_S $lease_s, sections${sections% }, seeds $seeds"
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
    && timeout 20 nvidia-smi || echo "no nvidia-smi"
  "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'cuda available', torch.cuda.is_available())"
  echo "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')," \
    "nproc $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)," \
    "memory $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
} > "$out/machine.txt" 2>&1
note "machine.txt written; work in ${work:-the checkout}"

# ------------------------------------------------------------------ packages: the carried wheels, then an import check
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}  # the package from this checkout, for every process
if [ "$dry" != 1 ]; then
  wheels=${WHEELS:-lease_wheels}
  site=${LEASE_SITE:-/tmp/lease_site}
  if [ -f "$wheels/requirements.txt" ]; then
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" --find-links "$wheels" -r "$wheels/requirements.txt" >> "$log" 2>&1; then
      note "installed $(tr '\n' ' ' < "$wheels/requirements.txt")into $site"
    else
      note "pip install from $wheels failed (its output is above)"
    fi
    export PYTHONPATH=$site:$PYTHONPATH
  else
    note "no $wheels/requirements.txt: run benchmarks/lease_wheels.sh where PyPI is reachable and carry $wheels"
  fi
fi
if ! "$py" - >> "$out/machine.txt" 2>> "$log" <<'EOF'
import importlib
import importlib.metadata as metadata
modules = {"torch": "torch", "monai": "monai", "ignite": "pytorch-ignite", "nibabel": "nibabel", "fire": "fire",
           "jsonschema": "jsonschema", "scipy": "scipy", "numpy": "numpy", "tensorboard": "tensorboard",
           "matplotlib": "matplotlib", "einops": "einops", "dmaf_components.cli": None}
for module in modules:
    importlib.import_module(module)
import dmaf_components  # noqa: E402
print("packages", " ".join(f"{d} {metadata.version(d)}" for d in modules.values() if d), "dmaf_components",
      dmaf_components.__version__, "from", dmaf_components.__path__[0])
EOF
then
  note "STOP: the imports failed (the error is above in lease.log); carry lease_wheels (benchmarks/lease_wheels.sh)"
  finish
  exit 3
fi
if [ "$device" = cuda ] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  note "STOP: torch sees no CUDA device"
  finish
  exit 3
fi
note "imports checked: $(tail -1 "$out/machine.txt")"

# ------------------------------------------------------------------ a. the training step
sec_step() {
  local args=(--device "$device" "${amp[@]}" --sizes "$step_size" --variants full baseline --masks all --skip-flops
              --json "$out/step.json")
  if grep -q -- '"--paths"' benchmarks/train_step.py; then
    args+=(--paths $step_paths --rounds "$step_rounds")
  else  # a checkout from before the compiled path: the eager step alone
    echo "train_step.py has no --paths/--rounds here: the eager path only" | tee -a "$out/step.log"
    args+=(--steps "$step_steps")
  fi
  echo "\$ python benchmarks/train_step.py ${args[*]}" >> "$out/step.log"
  timeout -k 5 "$1" "$py" benchmarks/train_step.py "${args[@]}" 2>&1 | tee -a "$out/step.log"
  return "${PIPESTATUS[0]}"
}

# ------------------------------------------------------------------ b. the loader wait in real epochs
sec_loader() {
  local args=(--data "$epoch_data" --json "$out/epoch.json" "${loader_args[@]}")
  echo "\$ python benchmarks/train_epoch.py ${args[*]}" >> "$out/loader.log"
  timeout -k 5 "$1" "$py" benchmarks/train_epoch.py "${args[@]}" 2>&1 \
    | grep --line-buffered -v "Epoch \[\|Iter:\|Loading dataset" | tee -a "$out/loader.log"
  return "${PIPESTATUS[0]}"
}

# ------------------------------------------------------------------ c. the anatomy study
packed=-1
# pack: the study folder (records, run descriptions, logs, summary, and lease_data/: the datalist and the voxels'
# checksums; no models, no TensorBoard events, not the README sent) into $OUT/study.tgz, replaced whole
pack() {
  local n
  n=$(find "$study_dir/runs" -name record.json 2>/dev/null | wc -l)
  [ "$n" = "$packed" ] && [ "${1:-}" != final ] && return 0
  mkdir -p "$work_meta"
  cp -f "$study_data/datalist.json" "$work_meta/" 2>/dev/null
  tar czf "$out/study.tgz.part" --exclude=models --exclude=eval --exclude='events.out*' \
    --exclude="$(basename "$study_dir")/README.md" \
    -C "$(dirname "$study_dir")" "$(basename "$study_dir")" && mv -f "$out/study.tgz.part" "$out/study.tgz"
  packed=$n
  note "study: $n run record(s) packed into study.tgz: $(cd "$study_dir" 2>/dev/null && find runs -name record.json \
    | sed 's#runs/##; s#/record.json##' | sort | tr '\n' ' ')"
}

sec_study() {
  local limit=$1 slog=$out/study.log profile=anatomy template=() shape=() rc pid end
  end=$((SECONDS + limit))
  until_end() { local l=$((end - SECONDS - ${1:-0})); echo $((l > 1 ? l : 1)); }  # (timeout 0 would mean none)
  work_meta=$study_dir/lease_data
  # the template: TEMPLATE_DIR, the carried lease_wheels/mni, else the installed nilearn's (dmaf finds it)
  local tdir=${TEMPLATE_DIR:-}
  if [ -z "$tdir" ] && [ -f lease_wheels/mni/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz ]; then
    tdir=lease_wheels/mni
  fi
  if [ -n "$tdir" ]; then
    template=(--template_dir "$tdir" --spacing "$study_spacing")
  elif "$py" -c "import nilearn" 2>/dev/null; then
    template=(--spacing "$study_spacing")
  elif [ "$dry" = 1 ]; then
    profile=demo shape=(--shape "$study_shape")
    note "study: no MNI template here (no TEMPLATE_DIR, lease_wheels/mni or nilearn): the dry run uses the demo profile"
  else
    note "study: no MNI template (carry lease_wheels, benchmarks/lease_wheels.sh): not run"
    return 2
  fi
  note "study: data, $study_cases cases, profile $profile"
  {
    echo "\$ dmaf synthetic brats $study_data --cases $study_cases --profile $profile ${template[*]} ${shape[*]}" \
      "--seed 2026"
    timeout -k 5 "$(until_end)" "$py" -m dmaf_components.cli synthetic brats "$study_data" --cases "$study_cases" \
      --profile "$profile" "${template[@]}" "${shape[@]}" --seed 2026 --workers "$gen_workers" \
      && { test -f "$study_data/datalist.json" \
           || timeout -k 5 "$(until_end)" "$py" -m dmaf_components.cli datalist brats "$study_data" \
                --split "$study_split" --seed 0 --exact; }
  } >> "$slog" 2>&1
  rc=$?
  if [ "$rc" != 0 ]; then
    note "study: the data could not be made (exit $rc, study.log says why)"
    return "$rc"
  fi
  # the voxels' checksums, so that the same data made elsewhere (another numpy/scipy) can be compared; in the
  # background, at low priority, while the runs start
  mkdir -p "$work_meta"
  nice -n 10 "$py" "$root/benchmarks/data_sha256.py" "$study_data" > "$work_meta/data_sha256.txt" 2>&1 &
  local nsettings nseeds
  nsettings=$(echo "$settings" | tr ',' '\n' | grep -c .)
  nseeds=$("$py" -c "import sys, ast; s = ast.literal_eval(sys.argv[1]); print(len(s) if isinstance(s, list) else s)" \
    "$seeds")
  local jobs=${JOBS:-$((nsettings * nseeds))}
  local cmd=("$py" -m dmaf_components.cli ablation brats "$study_data" --out "$study_dir" --settings "$settings"
             --seeds "$seeds" --jobs "$jobs" "${study_overrides[@]}")
  echo "\$ ${cmd[*]}" >> "$slog"
  note "study: $((nsettings * nseeds)) runs, $jobs at once, stopped after $(until_end 10) s at the latest"
  # the runner in the background under its own time limit (10 s kept for the last pack); its processes are killed
  # with it (timeout signals its whole process group)
  timeout -k 5 "$(until_end 10)" "${cmd[@]}" >> "$slog" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    pack
    sleep 3
  done
  wait "$pid"
  rc=$?
  wait  # the checksums
  pack final
  return "$rc"
}

trap 'note "interrupted"; [ -n "${work_meta:-}" ] && pack final; finish; exit 143' TERM INT

section step "$step_need" "$step_cap" sec_step
section loader "$loader_need" "$loader_cap" sec_loader
section study "$study_need" 100000 sec_study
finish

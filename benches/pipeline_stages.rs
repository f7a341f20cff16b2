//! Times each stage of the tensor core on a 2048x6144 dual-energy scan with
//! the bundled model: decode, transform, tile, infer (raw ONNX Runtime on the
//! same tiles), stitch, post-process, and the whole analysis. Run with
//! `make bench` (or `cargo bench -p niix-benches`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::{Array2, Array4};
use niix_benches::{SCAN, cargo_plane, dual_energy, fixtures, tiff_bytes};
use niix_inference::model::Model;
use niix_inference::pipeline::{self, analyze, decode_plane, fill_tile, lookup_table, stitch_tile, transform};
use niix_inference::regions::find_regions;
use niix_inference::runtime::Threads;
use niix_inference::tiling::Grid;

fn stages(c: &mut Criterion) {
    let (w, h) = SCAN;
    let model =
        Model::load(&fixtures().join("models/demo-local-contrast/1"), "demo-local-contrast", 1, Threads::default())
            .expect("the bundled model loads (run `make onnxruntime` first)");
    let m = &model.manifest;
    let high = tiff_bytes(w, h, &cargo_plane(w, h, false));
    let low = tiff_bytes(w, h, &cargo_plane(w, h, true));

    let mut g = c.benchmark_group("pipeline_2048x6144_dual_energy");
    g.sample_size(10);

    g.bench_function("decode", |b| {
        b.iter(|| {
            for mut p in dual_energy(&high, &low) {
                black_box(decode_plane(&mut p).expect("decodes"));
            }
        })
    });

    let planes: Vec<Array2<u16>> =
        dual_energy(&high, &low).iter_mut().map(|p| decode_plane(p).expect("decodes")).collect();
    let tables: Vec<Vec<f32>> = (0..2).map(|c| lookup_table(m, c)).collect();
    g.bench_function("transform", |b| b.iter(|| black_box(transform(&[&planes[0], &planes[1]], &tables))));

    let input = transform(&[&planes[0], &planes[1]], &tables);
    let pad: Vec<f32> = tables.iter().map(|t| t[65535]).collect();
    let grid = Grid::new(h as usize, w as usize, m.input.tile, m.input.overlap, model.stride);
    let tiles = grid.tiles();
    let side = m.input.tile;
    let mut batch = Array4::<f32>::zeros((m.input.batch, 2, side, side));
    g.bench_function("tile", |b| {
        b.iter(|| {
            for group in tiles.chunks(m.input.batch) {
                for (slot, t) in group.iter().enumerate() {
                    fill_tile(&mut batch, slot, input.view(), t, &pad);
                }
                black_box(&batch);
            }
        })
    });

    // Every batch of the scan, prepared once: "infer" is ONNX Runtime alone.
    let batches: Vec<Array4<f32>> = tiles
        .chunks(m.input.batch)
        .map(|group| {
            let mut b = Array4::<f32>::zeros((group.len(), 2, side, side));
            for (slot, t) in group.iter().enumerate() {
                fill_tile(&mut b, slot, input.view(), t, &pad);
            }
            b
        })
        .collect();
    g.bench_function("infer", |b| {
        b.iter(|| {
            for batch in &batches {
                model
                    .run(batch, |_, map| {
                        black_box(map);
                    })
                    .expect("runs");
            }
        })
    });

    let map_side = side / model.stride;
    let raw = vec![0.3f32; map_side * map_side];
    let (lo, hi) = (m.decision.score_min, m.decision.score_max);
    let mut map = Array2::<f32>::zeros(grid.map_shape());
    g.bench_function("stitch", |b| {
        b.iter(|| {
            for t in &tiles {
                stitch_tile(&mut map, t, map_side, model.stride, &raw);
            }
            pipeline::normalise(&mut map, lo, hi);
            black_box(&map);
        })
    });

    let analysis = analyze(&model, dual_energy(&high, &low)).expect("analyses");
    g.bench_function("postprocess", |b| {
        b.iter(|| {
            black_box(find_regions(
                analysis.map.view(),
                m.decision.threshold,
                model.stride,
                m.decision.min_region_area,
                (h as usize, w as usize),
            ))
        })
    });

    g.bench_function("analyze_end_to_end", |b| {
        b.iter(|| black_box(analyze(&model, dual_energy(&high, &low)).expect("analyses")))
    });
    g.finish();

    let t: pipeline::Timings = analysis.timings;
    println!(
        "stage shares of one analysis: decode {:?}, transform {:?}, tile {:?} (overlapped), infer {:?}, stitch {:?}, postprocess {:?}, total {:?}",
        t.decode, t.transform, t.tile, t.infer, t.stitch, t.postprocess, t.total
    );
}

criterion_group!(benches, stages);
criterion_main!(benches);

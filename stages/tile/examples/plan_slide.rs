//! Plans one slide as the `tile` stage would and writes its thumbnail, to check tissue
//! detection settings by eye: `cargo run -p tessera-tile --example plan_slide -- SLIDE OUT.png [MPP]`.

use tessera_tile::plan::{plan_slide, PlanOptions};
use tessera_tile::{SlideReader, Target, TissueParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(slide), Some(out)) = (args.get(1), args.get(2)) else {
        return Err("usage: plan_slide SLIDE OUT.png [TARGET_MPP]".into());
    };
    let target = match args.get(3) {
        Some(mpp) => Target::Mpp(mpp.parse()?),
        None => Target::Native,
    };
    let reader = SlideReader::open(slide)?;
    let options = PlanOptions {
        target,
        tile_px: 256,
        overlap_px: 0,
        min_tissue: 0.5,
        tissue: TissueParams::default(),
        picture_max_side: Some(1024),
    };
    let plan = plan_slide(&reader, None, &options)?;
    println!(
        "{} x {} px, level {} for {} level-0 px tiles: {} of {} kept, tissue {:.1}%",
        plan.dimensions.0,
        plan.dimensions.1,
        plan.level,
        plan.geometry.size0,
        plan.tiles.len(),
        plan.candidates,
        100.0 * plan.mask.coverage()
    );
    if let Some(picture) = &plan.picture {
        tessera_tile::thumbnail::write(
            out.as_ref(),
            picture,
            &plan.mask,
            &plan.tiles,
            plan.geometry.size0,
        )?;
    }
    Ok(())
}

//! Air against llama.cpp's recorded outputs, per prompt: first-step logits of llama.cpp's top 5
//! (Air / llama.cpp), and how far greedy decoding agrees (the first differing step and
//! llama.cpp's top-1/top-2 margin there).
//!
//! cargo run --release -p air-model --example parity -- MODEL.gguf tests/reference/public_MODEL.json

use air_gguf::GgufFile;
use air_model::{Logits, Model};

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, reference] = &args[..] else {
        return Err("usage: parity MODEL.gguf REFERENCE.json".into());
    };
    let file = GgufFile::open(model)?;
    let m = Model::load(&file)?;
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(reference)?)?;
    let mut worst = 0f64;
    for case in reference["prompts"].as_array().ok_or("no prompts")? {
        let prompt: Vec<u32> = case["prompt_ids"]
            .as_array()
            .ok_or("no ids")?
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect();
        let steps = case["steps"].as_array().ok_or("no steps")?;
        let mut cache = m.new_cache(prompt.len() + steps.len())?;
        let mut logits = m.forward(&prompt, &mut cache, Logits::Last)?;
        let mut line = String::new();
        for e in steps[0]["top5"].as_array().ok_or("no top5")? {
            let (id, theirs) = (e["id"].as_u64().unwrap_or(0) as usize, e["logit"].as_f64().unwrap_or(0.0));
            worst = worst.max((logits[id] as f64 - theirs).abs());
            line.push_str(&format!("{id}:{:.3}/{theirs:.3} ", logits[id]));
        }
        let mut agreement = format!("all {} steps agree", steps.len());
        for (i, step) in steps.iter().enumerate() {
            let got = argmax(&logits);
            if got as u64 != step["id"].as_u64().unwrap_or(0) {
                let t = &step["top5"];
                let margin = t[0]["logit"].as_f64().unwrap_or(0.0) - t[1]["logit"].as_f64().unwrap_or(0.0);
                agreement = format!("step {i} differs (llama.cpp margin {margin:.3})");
                break;
            }
            if i + 1 < steps.len() {
                logits = m.forward(&[got as u32], &mut cache, Logits::Last)?;
            }
        }
        println!("{:?}\n  {line}\n  {agreement}", case["prompt"].as_str().unwrap_or(""));
    }
    println!("largest first-step difference {worst:.3}");
    Ok(())
}

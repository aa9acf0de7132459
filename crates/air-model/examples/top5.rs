use air_gguf::GgufFile;
use air_model::{Logits, Model};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = GgufFile::open(&args[1]).unwrap();
    let m = Model::load(&file).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    for case in reference["prompts"].as_array().unwrap() {
        let prompt: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut cache = m.new_cache(prompt.len() + 1).unwrap();
        let logits = m.forward(&prompt, &mut cache, Logits::Last).unwrap();
        for e in case["steps"][0]["top5"].as_array().unwrap() {
            let id = e["id"].as_u64().unwrap() as usize;
            print!("{id}:{:.3}/{:.3} ", logits[id], e["logit"].as_f64().unwrap());
        }
        println!();
    }
}
